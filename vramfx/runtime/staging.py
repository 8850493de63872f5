"""The bounded pinned staging ring: reader threads fill slots, copies leave them in order.

Weights that are not page-locked (on disk, or host memory that could not be pinned) reach the
device through a ring of ``slots`` pinned buffers of ``slot_bytes`` each, whatever the model's
size. Reader threads fill slots in parallel (a DiskMap ``pread`` releases the GIL); the copies
are enqueued on the copy stream strictly in submission order, by whichever thread completes the
chunk that was holding the queue up, so disk reads, host-to-device copies and compute overlap
with no thread that only forwards work.

Ordering rules, each enforced at its spot below:

- staged chunk ``s`` uses slot ``s % slots``; it is refilled only once the copy of chunk
  ``s - slots`` out of it has *finished on the device* (an event recorded after that copy);
- a job's copies follow, on the copy stream, the events it was submitted with (the drops of
  whoever held its destination bytes before);
- a job's ``landed`` event is recorded after its last copy; waiting on it makes its bytes safe
  to read.

Deadlock freedom: chunks are read in sequence order (a FIFO pool) and slots are taken in the
same order, so a reader only ever waits for an earlier chunk, and an earlier chunk never waits
for a later one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vramfx.runtime.chunks import Chunk, Piece
from vramfx.runtime.streams import Streams
from vramfx.util import format_bytes

log = logging.getLogger(__name__)

#: Default ring: 8 slots of 32 MiB (256 MiB of pinned host memory), 4 reader threads.
SLOT_BYTES = 32 * 2**20
SLOTS = 8
READERS = 4

ReadPiece = Callable[[Piece, torch.Tensor], None]
HostView = Callable[[Piece], torch.Tensor]


class _Entry:
    """One chunk of a job: a direct copy, or a staged one with its sequence number and slot."""

    __slots__ = ("chunk", "seq", "slot", "ready", "error")

    def __init__(self, chunk: Chunk, seq: int = -1, slot: int = -1) -> None:
        self.chunk = chunk
        self.seq = seq
        self.slot = slot
        self.ready = not chunk.staged
        self.error: BaseException | None = None


class CopyJob:
    """The copies of one transfer (or one resident weight) into ``dst``.

    ``result()`` blocks until every copy is enqueued and raises the first read error; after it,
    a stream that waits on ``landed`` sees the bytes.
    """

    def __init__(self, tag: Any, dst: torch.Tensor, wait_for: Sequence[Any], landed: Any) -> None:
        self.tag = tag
        self.dst = dst
        self.wait_for = tuple(wait_for)
        self.landed = landed
        self.entries: list[_Entry] = []
        self.error: BaseException | None = None
        self._started = False
        self._next = 0
        self._enqueued = threading.Event()

    def result(self) -> None:
        self._enqueued.wait()
        if self.error is not None:
            raise self.error


class StagingPipeline:
    """Copies chunks to the device in order, staging what is not page-locked through a ring.

    Parameters
    ----------
    streams:
        The device primitives (copy stream, events, copies, host buffers).
    read_piece:
        Fills a slot region with a piece's bytes (called on reader threads).
    host_view:
        The page-locked host bytes of a direct piece.
    slot_bytes, slots:
        The ring: ``slots`` buffers of ``slot_bytes``; host memory used is their product.
    readers:
        Reader threads.

    Examples
    --------
    >>> pipe = StagingPipeline(streams, read_piece, host_view, slot_bytes=2**25, slots=8, readers=4)  # doctest: +SKIP
    >>> pipe.start()  # doctest: +SKIP
    >>> job = pipe.submit(arena, chunks, wait_for=[dropped])  # doctest: +SKIP
    >>> job.result(); streams.wait_event(streams.compute_stream(), job.landed)  # doctest: +SKIP
    """

    def __init__(
        self,
        streams: Streams,
        read_piece: ReadPiece,
        host_view: HostView,
        *,
        slot_bytes: int = SLOT_BYTES,
        slots: int = SLOTS,
        readers: int = READERS,
    ) -> None:
        if slot_bytes <= 0 or slots <= 0 or readers <= 0:
            raise ValueError(f"slot_bytes, slots and readers must be > 0, got {slot_bytes}, {slots}, {readers}")
        self.streams = streams
        self.read_piece = read_piece
        self.host_view = host_view
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.readers = readers
        self.pinned = True
        self._cond = threading.Condition()
        self._jobs: deque[CopyJob] = deque()
        self._next_seq = 0
        self._released: list[int] = []
        self._slot_events: list[Any] = []
        self._buffers: list[torch.Tensor] = []
        self._pool: ThreadPoolExecutor | None = None

    @property
    def host_bytes(self) -> int:
        """Host memory the ring holds."""
        return sum(b.numel() for b in self._buffers)

    def start(self) -> None:
        """Allocate the ring and start the readers."""
        if self._pool is not None:
            return
        try:
            self._buffers = [self.streams.host_buffer(self.slot_bytes, pinned=True) for _ in range(self.slots)]
            self.pinned = True
        except RuntimeError as exc:
            self._buffers = [self.streams.host_buffer(self.slot_bytes, pinned=False) for _ in range(self.slots)]
            self.pinned = False
            log.warning(
                "vramfx: could not allocate %s of pinned staging memory (%s); staging in pageable "
                "memory instead, which is slower: the driver copies it once more and each copy "
                "holds up the thread that issues it.",
                format_bytes(self.slot_bytes * self.slots),
                exc,
            )
        self._next_seq = 0
        # Slot k starts free, as if chunk k - slots had used it and finished.
        self._released = [k - self.slots for k in range(self.slots)]
        self._slot_events = [None] * self.slots
        self._pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="vramfx-stage")

    def stop(self) -> None:
        """Stop the readers and free the ring; every job must have been waited out."""
        if self._pool is None:
            return
        assert not self._jobs, "stop() with copies still queued"
        self._pool.shutdown(wait=True)
        self._pool = None
        # The copy stream has finished with the ring: the engine synchronized it before this.
        self._buffers = []
        self._slot_events = []

    def submit(self, dst: torch.Tensor, chunks: Sequence[Chunk], wait_for: Sequence[Any] = (), tag: Any = None) -> CopyJob:
        """Queue ``chunks`` into ``dst`` behind every earlier job; returns at once."""
        assert self._pool is not None, "submit() before start()"
        job = CopyJob(tag, dst, wait_for, self.streams.new_event())
        with self._cond:
            for chunk in chunks:
                if not chunk.staged:
                    job.entries.append(_Entry(chunk))
                    continue
                assert chunk.nbytes <= self.slot_bytes, "a staged chunk larger than a slot"
                seq = self._next_seq
                self._next_seq += 1
                entry = _Entry(chunk, seq, seq % self.slots)
                job.entries.append(entry)
                # Submitted under the lock so the FIFO pool sees chunks in sequence order.
                self._pool.submit(self._read, entry)
            self._jobs.append(job)
            self._pump()
        return job

    def _read(self, entry: _Entry) -> None:
        """Reader thread: wait for the slot, fill it, then let the queue move."""
        try:
            self._await_slot(entry.seq, entry.slot)
            buffer = self._buffers[entry.slot]
            for piece in entry.chunk.pieces:
                at = piece.dst_offset - entry.chunk.dst_start
                self.read_piece(piece, buffer[at : at + piece.nbytes])
        except BaseException as exc:  # surfaces at the job's result(), in the caller's thread
            entry.error = exc
        with self._cond:
            entry.ready = True
            self._pump()

    def _await_slot(self, seq: int, slot: int) -> None:
        """Block until the copy of chunk ``seq - slots`` has finished reading ``slot``."""
        with self._cond:
            while self._released[slot] < seq - self.slots:
                self._cond.wait()
            event = self._slot_events[slot]
        if event is not None:
            # The copy out of this slot was only enqueued; overwriting before it has run would
            # send the next chunk's bytes to the previous chunk's destination.
            self.streams.synchronize_event(event)

    def _pump(self) -> None:
        """Enqueue, in order, every chunk whose bytes are ready (the caller holds the lock)."""
        copy = self.streams.copy_stream
        while self._jobs:
            job = self._jobs[0]
            if not job._started:
                job._started = True
                for event in job.wait_for:
                    # The destination's previous holders are dropped on the compute stream;
                    # writing before it passes those drops would change weights still in use.
                    self._guarded(job, self.streams.wait_event, copy, event)
            while job._next < len(job.entries):
                entry = job.entries[job._next]
                if not entry.ready:
                    return
                self._issue(job, entry)
                job._next += 1
            self._guarded(job, self.streams.record, job.landed, copy)
            self._jobs.popleft()
            job._enqueued.set()

    def _issue(self, job: CopyJob, entry: _Entry) -> None:
        """Enqueue one chunk's copy (skipped once the job has failed) and free its slot after."""
        chunk = entry.chunk
        if job.error is None and entry.error is not None:
            job.error = entry.error
        if job.error is None:
            src = self._buffers[entry.slot][: chunk.nbytes] if chunk.staged else self.host_view(chunk.pieces[0])
            dst = job.dst[chunk.dst_start : chunk.dst_start + chunk.nbytes]
            self._guarded(job, self.streams.copy_async, dst, src, self.streams.copy_stream)
        if chunk.staged:
            event = self.streams.new_event()
            if not self._guarded(job, self.streams.record, event, self.streams.copy_stream):
                event = None
            self._released[entry.slot] = entry.seq
            self._slot_events[entry.slot] = event
            self._cond.notify_all()

    @staticmethod
    def _guarded(job: CopyJob, fn: Callable[..., None], *args: Any) -> bool:
        """Run a device call; a failure fails the job instead of the thread that made it."""
        try:
            fn(*args)
            return True
        except Exception as exc:
            if job.error is None:
                job.error = exc
            return False
