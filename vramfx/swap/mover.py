"""The weight mover: copies a unit's parameters onto the compute device, now or ahead of time.

Ahead-of-time copies run on one background thread, in the order they are asked for, so reads of
one file stay sequential. On CPU the thread reads straight into arena blocks (``pread`` and torch
copies release the GIL, so compute goes on meanwhile). On CUDA it copies on a side stream, after
the compute stream has finished with the block it writes (an event recorded at each release).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vramfx.swap.units import Unit, fill

log = logging.getLogger(__name__)


class Mover:
    """Copies units' parameters to ``device``, on the caller's thread or a reader thread."""

    def __init__(self, device: torch.device, *, bypass_page_cache: bool = False) -> None:
        self.device = device
        self.bypass_page_cache = bypass_page_cache
        self._reader: ThreadPoolExecutor | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._released: Any = None  # CUDA event: the compute stream's latest release of a block

    def load(self, unit: Unit, outs: dict[int, torch.Tensor]) -> None:
        """Fill ``outs`` (slot index → tensor on the device) now, on the caller's stream."""
        for i, out in outs.items():
            fill(out, unit.home[i], unit.slots[i].ref, unit.stored_dtype(i), bypass_page_cache=self.bypass_page_cache)

    def submit(self, jobs: list[tuple[Unit, dict[int, torch.Tensor]]]) -> Future:
        """Start filling each unit's ``outs`` on the reader thread, in order; :meth:`finish` waits."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramfx-swap-reader")
        # Homes may move before the job runs: it copies from the ones current now.
        copies = [
            (unit.home[i], unit.slots[i].ref, unit.stored_dtype(i), out) for unit, outs in jobs for i, out in outs.items()
        ]
        return self._reader.submit(self._copy_ahead, copies, self._released)

    def finish(self, future: Future) -> None:
        """Block until the copy behind ``future`` is usable by the compute stream; re-raise its error."""
        future.result()

    def drain(self, future: Future) -> None:
        """Wait for a copy that is no longer wanted to stop writing, ignoring its error."""
        try:
            future.result()
        except Exception as exc:  # the copy's result is discarded; only its end matters here
            log.debug("discarded a failed prefetch: %s", exc)

    def note_release(self) -> None:
        """The compute stream is done with a block: later copies into it must wait for that."""
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._released = event

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    def _copy_ahead(self, copies: list[tuple[Any, Any, Any, torch.Tensor]], released: Any) -> None:
        def copy() -> None:
            for home, ref, stored, out in copies:
                fill(out, home, ref, stored, bypass_page_cache=self.bypass_page_cache, non_blocking=True)

        if self._stream is None:
            copy()
            return
        with torch.cuda.stream(self._stream):
            if released is not None:
                self._stream.wait_event(released)  # the slots may still be read by earlier kernels
            copy()
            done = torch.cuda.Event()
            done.record(self._stream)
        # Pinned staging buffers die with this frame: the copies must be complete first.
        done.synchronize()
