"""CUDA stream semantics on host threads, so the CUDA engine's ordering runs in CPU tests.

A stream is a worker thread that runs enqueued work in order; an event is set when the stream
reaches it; ``wait_event`` enqueues a wait, so it holds up the stream, not the host. A copy reads
its source when the worker runs it, as a DMA does, so a source overwritten too early shows up as
wrong bytes. The compute stream is synchronous by default (the graph's ops run on the calling
thread, so they are done before the next step); ``async_compute=True`` makes it a worker too,
for tests that enqueue their own "kernels" with :meth:`ThreadStreams.launch`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable

import torch

TIMEOUT_S = 30.0


class FakeEvent:
    """A one-shot event: recorded once, set when its stream reaches it."""

    def __init__(self) -> None:
        self.recorded = False
        self.flag = threading.Event()

    def wait(self) -> None:
        assert self.recorded, "waited on an event that was never recorded"
        assert self.flag.wait(TIMEOUT_S), "event never reached: a stream is stuck (deadlock?)"


class SyncStream:
    """Work runs at once, on the caller's thread."""

    def enqueue(self, fn: Callable[[], None]) -> None:
        fn()

    def close(self) -> None:
        pass


class WorkerStream:
    """Work runs in order on one thread, each item after an optional random delay."""

    def __init__(self, name: str, max_delay_s: float = 0.0, seed: int = 0) -> None:
        self.max_delay_s = max_delay_s
        self.errors: list[BaseException] = []
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"fake-{name}", daemon=True)
        self._thread.start()

    def enqueue(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            if self.max_delay_s:
                time.sleep(self._random.uniform(0, self.max_delay_s))
            try:
                fn()
            except BaseException as exc:  # reported by the test through ``errors``
                self.errors.append(exc)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(TIMEOUT_S)


class ThreadStreams:
    """The engine's ``Streams`` on CPU memory.

    Parameters
    ----------
    copy_delay_s:
        Each copy-stream item waits up to this long first: copies lag behind the host, as on a
        GPU, which exposes any reuse of memory a copy has not read yet.
    async_compute:
        Run compute-stream work on its own thread too.
    fail_pinned_alloc:
        ``host_buffer(pinned=True)`` raises, as when pinned memory runs out.
    """

    def __init__(self, *, copy_delay_s: float = 0.0, async_compute: bool = False, fail_pinned_alloc: bool = False) -> None:
        self.copy_stream = WorkerStream("copy", copy_delay_s)
        self.compute = WorkerStream("compute") if async_compute else SyncStream()
        self.fail_pinned_alloc = fail_pinned_alloc
        self.copies = 0
        self.waits = 0

    def compute_stream(self):
        return self.compute

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    def record(self, event: FakeEvent, stream) -> None:
        assert not event.recorded, "an event recorded twice: a waiter could see the later record"
        event.recorded = True
        stream.enqueue(event.flag.set)

    def wait_event(self, stream, event: FakeEvent) -> None:
        assert event.recorded, "a stream told to wait on an event never recorded"
        self.waits += 1
        stream.enqueue(event.wait)

    def synchronize_event(self, event: FakeEvent) -> None:
        event.wait()

    def synchronize_stream(self, stream) -> None:
        event = self.new_event()
        self.record(event, stream)
        event.wait()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        assert dst.numel() == src.numel() and dst.dtype == src.dtype == torch.uint8
        self.copies += 1
        stream.enqueue(lambda: dst.copy_(src))

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        # Garbage, not zeros: a copy that never happened must show.
        return torch.full((nbytes,), 0xA5, dtype=torch.uint8)

    def host_buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        if pinned and self.fail_pinned_alloc:
            raise RuntimeError("CUDA error: out of memory (injected, pinned host allocation)")
        return torch.empty(nbytes, dtype=torch.uint8)

    def launch(self, fn: Callable[[], None]) -> None:
        """Enqueue a "kernel" on the compute stream."""
        self.compute.enqueue(fn)

    def close(self) -> None:
        self.copy_stream.close()
        self.compute.close()
        errors = self.copy_stream.errors + getattr(self.compute, "errors", [])
        assert not errors, f"stream work failed: {errors[0]!r}"


class FakePinner:
    """Registers host ranges in a table; refuses overlaps, and everything past ``limit_bytes``."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.ranges: dict[int, int] = {}

    @property
    def pinned_bytes(self) -> int:
        return sum(self.ranges.values())

    def register(self, address: int, nbytes: int) -> None:
        assert address % 4096 == 0 and nbytes % 4096 == 0, "only whole pages may be registered"
        if self.limit_bytes is not None and self.pinned_bytes + nbytes > self.limit_bytes:
            raise RuntimeError("cudaHostRegister failed with cudaError 2 (injected memlock limit)")
        for start, size in self.ranges.items():
            assert address + nbytes <= start or start + size <= address, "a range registered twice"
        self.ranges[address] = nbytes

    def unregister(self, address: int) -> None:
        del self.ranges[address]

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False
