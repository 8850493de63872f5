"""Measuring memory the way the budget is defined: RssAnon on CPU, max_memory_allocated on CUDA.

Tests and benchmarks use these; the library itself only reads :func:`memory_in_use`, where a first
call measures its activations, and trims freed memory after a capture (:func:`release_freed_memory`),
so the arena reuses capture's pages instead of growing RssAnon.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from types import TracebackType

import torch

from vramfx.budget import rss_anon_bytes


def memory_in_use(device: torch.device) -> int:
    """Memory in use on ``device`` now, as the budget counts it: RssAnon on CPU, allocated on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_anon_bytes()


def release_freed_memory(*, collect_garbage: bool = True) -> None:
    """Free what is garbage and hand the heap glibc keeps after frees back to the OS, so RssAnon
    growth measured next counts what is in use (otherwise later allocations reuse freed pages and
    barely grow it). Elsewhere than glibc it only collects garbage: deltas are rougher.
    ``collect_garbage=False`` skips the collection (tenths of a second in a large process) where
    what was freed is known to be unreferenced."""
    if collect_garbage:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak growth of device memory over a ``with`` block.

    On CPU a sampling thread reads RssAnon every ``interval`` seconds (a short spike between two
    samples can be missed; the final value is always included). On CUDA it resets and reads
    ``torch.cuda.max_memory_allocated``.

    Examples
    --------
    >>> with PeakMemory("cpu") as peak:
    ...     x = torch.ones(2**20)
    >>> peak.growth_bytes >= 0
    True
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = rss_anon_bytes()
            self.peak_bytes = self.baseline_bytes
            self._thread = threading.Thread(target=self._sample, name="vramfx-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())
            time.sleep(self.interval)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())


def link_bytes_per_s(weights: object, *, bypass_page_cache: bool = False, max_bytes: int = 256 * 2**20,
                     trials: int = 3) -> float:
    """Bytes per second the CPU reader moves weights of ``weights`` (a :class:`vramfx.DiskMap`)
    at, timed over its largest tensors up to ``max_bytes``: from the page cache as it is now, or
    from the disk with ``bypass_page_cache`` (``O_DIRECT``). For
    ``CostModel.calibrate(device, link_bytes_per_s=...)``: the link a plan's transfers are
    priced at. The median of ``trials`` passes: one pass at a moment the machine is busy read
    less than half the rate of the others.

    Examples
    --------
    >>> cm = vramfx.CostModel.calibrate("cpu", link_bytes_per_s=link_bytes_per_s(dm))  # doctest: +SKIP
    """
    if trials < 1:
        raise ValueError(f"link_bytes_per_s: trials must be >= 1, got {trials}")
    keys = sorted(weights, key=lambda k: -weights.info(k).nbytes)
    chosen, total = [], 0
    for key in keys:
        if total and total + weights.info(key).nbytes > max_bytes:
            break
        chosen.append(key)
        total += weights.info(key).nbytes
    if not total:
        raise ValueError("link_bytes_per_s: the weights hold no bytes to time")
    buffer = torch.empty(max(weights.info(k).nbytes for k in chosen), dtype=torch.uint8)
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for key in chosen:
            weights.read_into(key, buffer[: weights.info(key).nbytes], bypass_page_cache=bypass_page_cache)
        rates.append(total / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)
