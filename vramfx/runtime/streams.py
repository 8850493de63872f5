"""The device primitives the CUDA engine is written against: streams, events, copies, memory.

The engine, the staging pipeline and the pinned host memory only call these methods, so tests
run every piece of their ordering logic on CPU with a stand-in whose streams are host threads
(``tests/fake_streams.py``). :class:`CudaStreams` is the real thing.

Semantics follow CUDA's: work enqueued on one stream runs in order; ``wait_event`` makes a
stream wait, on the device, until an event recorded on another stream has been reached, and
never blocks the host; ``synchronize_event`` blocks the host.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Streams(Protocol):
    """What the CUDA engine asks of a device."""

    copy_stream: Any

    def compute_stream(self) -> Any:
        """The stream the graph's kernels run on right now."""

    def new_event(self) -> Any:
        """A fresh event; the engine records each event once, so no wait sees a later record."""

    def record(self, event: Any, stream: Any) -> None:
        """Mark the point ``stream`` has reached once everything enqueued so far has run."""

    def wait_event(self, stream: Any, event: Any) -> None:
        """Make ``stream``'s later work wait for ``event``, on the device."""

    def synchronize_event(self, event: Any) -> None:
        """Block the host until ``event`` has been reached."""

    def synchronize_stream(self, stream: Any) -> None:
        """Block the host until everything enqueued on ``stream`` has run."""

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Enqueue ``dst.copy_(src)`` (host uint8 to device uint8) on ``stream``; ``src`` is read
        when the copy runs, not now."""

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of uint8 on the device, allocated on the compute stream."""

    def host_buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        """``nbytes`` of uint8 host memory, page-locked if ``pinned``; raises if that fails."""


class CudaStreams:
    """:class:`Streams` on one CUDA device, with a dedicated copy stream.

    Parameters
    ----------
    device:
        The CUDA device the graph computes on.

    Examples
    --------
    >>> streams = CudaStreams(torch.device("cuda", 0))  # doctest: +SKIP
    >>> done = streams.new_event()  # doctest: +SKIP
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Copies get their own stream so they run on a copy engine beside the kernels.
        self.copy_stream = torch.cuda.Stream(device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def synchronize_event(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def synchronize_stream(self, stream: torch.cuda.Stream) -> None:
        stream.synchronize()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        # torch enqueues a non-blocking copy on the current stream: make that the copy stream.
        # From page-locked memory this is a DMA that reads ``src`` later, so ``src`` must stay
        # untouched and alive until an event recorded after it has completed.
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        # Allocated on the compute stream: the caching allocator may hand the memory to that
        # stream again as soon as it is freed, so the engine frees device buffers only after
        # the copy stream has finished writing them.
        with torch.cuda.device(self.device):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def host_buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
