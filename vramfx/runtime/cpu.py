"""The CPU engine: a background reader thread fills arena slots straight from the weight source.

Compute and reads overlap because the reader's ``pread`` releases the GIL. Reads are issued in
plan order on one thread, so a slot is never written while an earlier transfer to the same bytes
is still in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vramfx.plan.plan import Plan, Transfer
from vramfx.runtime.engine import Engine, ResidentStore, view_bytes
from vramfx.storage.ref import WeightRef


class CpuEngine(Engine):
    """Streams weights into a CPU arena on one reader thread.

    Parameters
    ----------
    bypass_page_cache:
        Read DiskMap weights with ``O_DIRECT`` so a model larger than RAM does not fill the page
        cache (and cold-disk reads are measured honestly).
    """

    def __init__(
        self,
        plan: Plan,
        refs: Mapping[str, WeightRef],
        device: torch.device,
        store: ResidentStore,
        *,
        bypass_page_cache: bool = False,
    ) -> None:
        super().__init__(plan, refs, device, store)
        self.bypass_page_cache = bypass_page_cache
        self._reader: ThreadPoolExecutor | None = None

    def _start_workers(self) -> None:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramfx-reader")

    def _stop_workers(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    def _forget_workers(self) -> None:
        self._reader = None

    def _allocate(self, nbytes: int) -> torch.Tensor:
        # The CPU allocator aligns to 64 bytes, which the plan's offsets keep for every slot.
        # Touched at once: the budget counts the buffer whole, and so then does RssAnon.
        return torch.zeros(nbytes, dtype=torch.uint8)

    def _load_resident(self, ref: WeightRef) -> torch.Tensor:
        buffer = torch.empty(ref.nbytes, dtype=torch.uint8)
        ref.read_into(buffer, bypass_page_cache=self.bypass_page_cache)
        return view_bytes(buffer, 0, ref)

    def _start(self, transfer: Transfer, views: tuple[torch.Tensor, ...]) -> Future:
        assert self._arena is not None, "engine used before activate()"
        if self._reader is None:  # a child forked after activate(): the parent's thread is not here
            self._start_workers()
        assert self._reader is not None
        jobs = [
            (self.refs[name], self._arena[off : off + size])
            for name, off, size in zip(transfer.names, transfer.offsets, transfer.sizes)
        ]
        return self._reader.submit(self._read, jobs)

    def _copy_now(self, buffer: torch.Tensor, members: Sequence[tuple[WeightRef, int]]) -> None:
        # The reader thread only writes bytes reserved for transfers in flight, never these.
        self._read([(ref, buffer[offset : offset + ref.nbytes]) for ref, offset in members])

    def _read(self, jobs: list[tuple[WeightRef, torch.Tensor]]) -> None:
        for ref, raw in jobs:
            ref.read_into(raw, bypass_page_cache=self.bypass_page_cache)

    def _finish(self, handle: Future) -> None:
        handle.result()
