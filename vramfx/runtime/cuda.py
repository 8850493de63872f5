"""The CUDA engine: weights copied into the arena on a dedicated copy stream while kernels run.

Per transfer, in graph order:

- ``fetch`` queues the transfer's copies on the copy stream, behind an event for every previous
  holder of its arena bytes (their ``drop``); it returns at once.
- ``wait`` makes the compute stream wait, on the device, for the copies' ``landed`` event.
- ``drop`` records an event on the compute stream after the last kernel that reads the weights;
  the next copy into those bytes waits for it.

Host weights are page-locked where they lie (:mod:`vramfx.runtime.pinned`) and copied straight
from there; weights on disk, and host bytes that could not be pinned, go through the bounded
pinned staging ring (:mod:`vramfx.runtime.staging`). Resident weights take the same path once.

The budget on the device is the plan's: one arena allocation, one allocation per resident weight
(each rounded up to the plan's alignment), the activations the graph allocates, and the stated
workspace margin. Staging and pinned memory are host memory.

No ``record_stream``: the copy stream only writes the arena and resident buffers, which are
allocated on the compute stream and freed only after the copy stream has been synchronized
(``abort``, called by ``deactivate``; residents are waited for as they load), so the caching
allocator never hands out memory a copy may still write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vramfx.errors import VramfxError
from vramfx.plan.plan import Plan, Transfer
from vramfx.runtime.arena import reuse_predecessors
from vramfx.runtime.chunks import Chunk, Member, Piece, Segment, plan_chunks, whole
from vramfx.runtime.engine import Engine, ResidentStore, view_bytes
from vramfx.runtime.pinned import CudaHostPinner, PinnedHostMemory
from vramfx.runtime.sources import host_bytes, read_range
from vramfx.runtime.staging import READERS, SLOT_BYTES, SLOTS, CopyJob, StagingPipeline
from vramfx.runtime.streams import CudaStreams, Streams
from vramfx.util import align_up
from vramfx.storage.ref import WeightRef

#: The smallest staging slot worth allocating, even for a model of tiny weights.
MIN_SLOT_BYTES = 64 * 2**10


class CudaEngine(Engine):
    """Streams a Plan's weights into a CUDA arena, overlapping copies with compute.

    Weights are copied byte for byte, in the dtype they are stored in. A plan's casts to the
    compute dtype (:meth:`~vramfx.runtime.engine.Engine.cast`) run on the compute stream after
    the ``wait``; the copies here do not change.

    Parameters
    ----------
    plan, refs, device, store:
        As for every :class:`~vramfx.runtime.engine.Engine`.
    bypass_page_cache:
        Read DiskMap weights with ``O_DIRECT``.
    streams:
        Device primitives; :class:`~vramfx.runtime.streams.CudaStreams` on ``device`` by default
        (tests pass host-thread stand-ins).
    pin_host:
        Page-lock host weights in place (``cudaHostRegister``); ``False`` stages them instead.
    pinned:
        The pinned host memory to use instead of the default (tests pass one with a stand-in
        pinner and small chunks).
    slot_bytes, slots, readers:
        The staging ring: at most ``slots`` buffers of ``slot_bytes`` pinned host memory, filled
        by ``readers`` threads. Host memory for disk weights stays within it, whatever the
        model's size.

    Examples
    --------
    >>> fast = vramfx.compile(model, budget="8GB", weights=vramfx.DiskMap("model/"), device="cuda")  # doctest: +SKIP
    >>> type(fast.compiled_graphs[0].engine).__name__  # doctest: +SKIP
    'CudaEngine'
    """

    def __init__(
        self,
        plan: Plan,
        refs: Mapping[str, WeightRef],
        device: torch.device,
        store: ResidentStore,
        *,
        bypass_page_cache: bool = False,
        streams: Streams | None = None,
        pin_host: bool = True,
        pinned: PinnedHostMemory | None = None,
        slot_bytes: int = SLOT_BYTES,
        slots: int = SLOTS,
        readers: int = READERS,
    ) -> None:
        super().__init__(plan, refs, device, store)
        self.bypass_page_cache = bypass_page_cache
        self.streams = streams if streams is not None else CudaStreams(device)
        if pin_host and pinned is None:
            pinned = PinnedHostMemory(CudaHostPinner())
        self.pinned = pinned if pin_host else None
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.readers = readers
        self._reuse = reuse_predecessors(plan)
        self._dropped: dict[int, Any] = {}  # transfer id -> event at its latest drop
        self._fenced: Any = None  # event: the compute stream when a load off the plan was unloaded
        self._chunks: dict[int, tuple[Chunk, ...]] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._pipeline: StagingPipeline | None = None
        self._forked = False

    @property
    def staging_bytes(self) -> int:
        """Host memory the staging ring holds while active."""
        return self._pipeline.host_bytes if self._pipeline is not None else 0

    # -- workers ---------------------------------------------------------------------------
    def activate(self) -> None:
        if self._forked:
            raise VramfxError(
                "this model was compiled for CUDA in a parent process, and CUDA cannot be used in a "
                "process forked from one that used it; start workers with the 'spawn' method "
                "(multiprocessing.set_start_method('spawn')) and compile the model in each of them"
            )
        super().activate()

    def _forget_workers(self) -> None:
        self._forked = True
        self._pipeline = None
        self._host, self._chunks = {}, {}
        self._dropped.clear()

    def _start_workers(self) -> None:
        if self._pipeline is not None:
            return
        streamed = sorted({name for t in self.plan.transfers for name in t.names})
        self._host = {n: b for n in streamed if (b := host_bytes(self.refs[n])) is not None}
        if self.pinned is not None and self._host:
            self.pinned.pin(self._host)
        self._chunks = {t.id: self._plan_transfer(t) for t in self.plan.transfers}
        staged = [c.nbytes for cs in self._chunks.values() for c in cs if c.staged]
        # Residents, and weights a front end may load off the plan, go through the ring too.
        staged += [ref.nbytes for name, ref in self.refs.items() if name not in self._host]
        slot_bytes = min(self.slot_bytes, max([MIN_SLOT_BYTES, *staged]))
        self._pipeline = StagingPipeline(
            self.streams, self._read_piece, self._host_view, slot_bytes=slot_bytes, slots=self.slots, readers=self.readers
        )
        self._pipeline.start()

    def _stop_workers(self) -> None:
        if self._pipeline is None:
            return
        # abort() has synchronized the copy stream: no copy reads the ring or pinned weights now.
        self._pipeline.stop()
        self._pipeline = None
        if self.pinned is not None:
            self.pinned.release()
        self._host = {}
        self._chunks = {}

    def _plan_transfer(self, transfer: Transfer) -> tuple[Chunk, ...]:
        """The copies of one transfer, cut to the ring's slots."""
        align = self.plan.alignment
        members = [
            Member(name, off, size, min(align_up(off + size, align), self.plan.arena_bytes))
            for name, off, size in zip(transfer.names, transfer.offsets, transfer.sizes)
        ]
        return plan_chunks(members, {m.name: self._segments(m.name, m.nbytes) for m in members}, self.slot_bytes)

    def _segments(self, name: str, nbytes: int) -> tuple[Segment, ...]:
        if self.pinned is not None and name in self._host:
            return self.pinned.segments(name, nbytes)
        return whole(nbytes)

    def _read_piece(self, piece: Piece, out: torch.Tensor) -> None:
        read_range(self.refs[piece.name], piece.src_start, out, bypass_page_cache=self.bypass_page_cache)

    def _host_view(self, piece: Piece) -> torch.Tensor:
        return self._host[piece.name][piece.src_start : piece.src_start + piece.nbytes]

    # -- device hooks ----------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> torch.Tensor:
        # The caching allocator aligns to 512 bytes, more than the plan's 256-byte offsets need.
        return self.streams.device_buffer(nbytes)

    def _load_resident(self, ref: WeightRef) -> torch.Tensor:
        assert self._pipeline is not None, "engine used before activate()"
        size = align_up(ref.nbytes, self.plan.alignment)  # as the plan counts it
        buffer = self.streams.device_buffer(size)
        chunks = plan_chunks([Member(ref.name, 0, ref.nbytes, size)], {ref.name: whole(ref.nbytes)}, self._pipeline.slot_bytes)
        job = self._pipeline.submit(buffer, chunks, tag=ref.name)
        job.result()  # an I/O error is named by Engine.activate
        # Loaded once, so wait on the host: the buffer is then never freed under a running copy.
        self.streams.synchronize_event(job.landed)
        return view_bytes(buffer, 0, ref)

    def _start(self, transfer: Transfer, views: tuple[torch.Tensor, ...]) -> CopyJob:
        assert self._pipeline is not None and self._arena is not None, "engine used before activate()"
        # Events are snapshotted now: a later drop records a new event, never re-records this one.
        wait_for = [self._dropped[p] for p in self._reuse[transfer.id] if p in self._dropped]
        if self._fenced is not None:  # a load off the plan may have used these bytes
            wait_for.append(self._fenced)
        return self._pipeline.submit(self._arena, self._chunks[transfer.id], wait_for, tag=transfer.id)

    def _copy_now(self, buffer: torch.Tensor, members: Sequence[tuple[WeightRef, int]]) -> None:
        assert self._pipeline is not None, "engine used before activate()"
        align = self.plan.alignment
        placed = [Member(ref.name, offset, ref.nbytes, align_up(offset + ref.nbytes, align)) for ref, offset in members]
        chunks = plan_chunks(placed, {m.name: self._segments(m.name, m.nbytes) for m in placed}, self._pipeline.slot_bytes)
        # Free bytes may still be read by kernels queued before now (a dropped transfer, an
        # unloaded block): the copies wait for the compute stream to pass this point.
        now = self.streams.new_event()
        self.streams.record(now, self.streams.compute_stream())
        job = self._pipeline.submit(buffer, chunks, [now], tag="load")
        self._finish(job)

    def _fence(self) -> None:
        event = self.streams.new_event()
        self.streams.record(event, self.streams.compute_stream())
        self._fenced = event

    def _finish(self, job: CopyJob) -> None:
        job.result()
        # Kernels enqueued from here on read the slots only after the copies have landed; the
        # host does not block, so it keeps queueing kernels ahead of the device.
        self.streams.wait_event(self.streams.compute_stream(), job.landed)

    def _release(self, job: CopyJob) -> None:
        # Every kernel that reads this transfer was enqueued before this point of the compute
        # stream; the next copy into its bytes waits for this event, not for the host.
        event = self.streams.new_event()
        self.streams.record(event, self.streams.compute_stream())
        self._dropped[job.tag] = event

    def abort(self) -> None:
        """Wait out queued copies, then both streams: kernels of a failed call may still read
        arena slots the next call's copies would overwrite."""
        super().abort()
        if self._pipeline is not None:
            self.streams.synchronize_stream(self.streams.copy_stream)
            self.streams.synchronize_stream(self.streams.compute_stream())
        self._dropped.clear()
        self._fenced = None
