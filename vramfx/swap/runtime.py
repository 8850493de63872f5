"""The layer-swap runtime: which units stay on the device, and fetching the others ahead.

One runtime serves every unit of one model. Per call of the model:

- **The first call** streams every unit synchronously (its weights are copied in right before
  its forward and released right after) and records the order units run in, with each one's
  compute time.
- **After it**, the planner (:func:`vramfx.plan.schedule.schedule`, over a Liveness whose
  positions are unit calls) chooses the units kept on the device under the limit; the rest of
  the limit is one arena that the other units stream through.
- **Later calls** prefetch: after every unit call, the units next in the recorded order are
  copied into free arena blocks by a reader thread, as far ahead as the arena allows (across
  the end of a call into the next one). A unit that is not where the order predicts costs a
  synchronous fetch, never a wrong result; a call whose order differed becomes the new
  recorded order and is planned anew.

The limit covers what the runtime holds on the device: kept units, the arena, staging and
per-call casts. A limit below what one unit needs (``0`` included) streams every unit
synchronously, one at a time: the least any limit can take.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.errors import BudgetError, VramfxError, WeightsError
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import format_bytes
from vramfx.plan.schedule import schedule
from vramfx.runtime.engine import view_bytes
from vramfx.swap.arena import Arena
from vramfx.swap.mover import Mover
from vramfx.swap.record import CallRecord, Recorder, to_liveness, unit_seconds
from vramfx.swap.units import Unit

log = logging.getLogger(__name__)

#: Calls a plan is optimised for, as :func:`vramfx.compile`'s default.
PLANNED_CALLS = 10
#: Block alignment in the arena: what kernels would see in eager.
ALIGNMENT = {"cpu": 64, "cuda": 256}


@dataclass(frozen=True)
class SwapStats:
    """What a layer-swap runtime holds, and what its latest call did.

    Attributes
    ----------
    limit_bytes:
        The limit over the weights it holds on the device (None: no limit).
    resident:
        Units the plan keeps on the device, in order of first use.
    resident_bytes, arena_bytes:
        Bytes of the kept units, and of the arena the others stream through.
    calls:
        Calls served so far.
    fetched_bytes:
        Bytes copied to the device during the latest call.
    prefetched, synchronous:
        Unit copies of the latest call that were made ahead, and that the call waited on
        from the start (the first call's, a mispredicted unit's, or every one when nothing
        can be held ahead).
    held_peak_bytes:
        The most bytes the runtime has held on the device at once, by its own accounting.
    order:
        The recorded order of units (their names), empty before the first call.
    """

    limit_bytes: int | None
    resident: tuple[str, ...]
    resident_bytes: int
    arena_bytes: int
    calls: int
    fetched_bytes: int
    prefetched: int
    synchronous: int
    held_peak_bytes: int
    order: tuple[str, ...]


@dataclass
class _Held:
    """One unit's computation tensors while they are queued or in use."""

    unit: Unit
    tensors: tuple[torch.Tensor, ...]
    nbytes: int = 0  # bytes outside the arena counted while held
    block: tuple[int, int] | None = None  # (offset, nbytes) in the arena
    future: Any = None  # the copy in flight, until waited for
    position: int = -1  # global position: cycle * len(order) + index in the order


class SwapRuntime:
    """Serves units their weights on the compute device under a byte limit.

    Parameters
    ----------
    device:
        The computation device.
    limit_bytes:
        Bytes of weights the runtime may hold on the device at once (None: no limit, every
        unit is kept after its first use).
    prefetch:
        Copy the next units ahead along the recorded order. ``False`` copies each unit when
        it is called, as the original layer-swap implementation does.
    calls:
        How many calls the plan is optimised for: kept units are loaded once.
    reserved_bytes:
        Bytes of the limit taken by things outside the units (compile's margin, buffers moved
        to the device), so the limit is a whole budget.
    activations_in_limit:
        The limit also covers activations, measured on the first call (compile's fallback).
        A limit that then cannot hold the largest unit raises BudgetError instead of streaming
        synchronously.
    bypass_page_cache:
        Read DiskMap weights with ``O_DIRECT``.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        limit_bytes: int | None,
        prefetch: bool = True,
        calls: int = PLANNED_CALLS,
        reserved_bytes: int = 0,
        activations_in_limit: bool = False,
        bypass_page_cache: bool = False,
    ) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self.prefetch = prefetch
        self.calls = calls
        self.reserved_bytes = reserved_bytes
        self.activations_in_limit = activations_in_limit
        self.units: list[Unit] = []
        self.alignment = ALIGNMENT.get(device.type, 64)
        self.cost_model = CostModel.for_device(device)
        self._mover = Mover(device, bypass_page_cache=bypass_page_cache)
        # The recorded order and what was planned for it.
        self._order: tuple[int, ...] | None = None
        self._ends: tuple[int, ...] = ()
        self._positions: dict[int, list[int]] = {}
        self._seconds: dict[int, float] = {}
        self._activation_peak = 0
        self._resident: frozenset[int] = frozenset()
        self._capacity = 0
        self._synchronous_only = False
        self._needs_plan = False
        # What is held now.
        self._arena: Arena | None = None
        self._kept: dict[int, tuple[torch.Tensor, ...]] = {}
        self._kept_bytes = 0
        self._loose_bytes = 0
        self._queue: deque[_Held] = deque()
        self._in_use: list[_Held] = []
        # The call in progress.
        self._depth = 0
        self._recorder: Recorder | None = None
        self._cursor = -1  # global position of the latest unit served
        self._calls = 0
        self._fetched = 0
        self._prefetched = 0
        self._synchronous = 0
        self._held_peak = 0

    def add(self, unit: Unit) -> Unit:
        """Serve ``unit`` from now on."""
        unit.index = len(self.units)
        self.units.append(unit)
        self._needs_plan = True
        return unit

    # -- what it holds -------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes of weights on the device now, by the runtime's own accounting."""
        arena = self._arena.nbytes if self._arena is not None else 0
        return self._kept_bytes + arena + self._loose_bytes

    def stats(self) -> SwapStats:
        """What is held, and what the latest call did."""
        resident = [u for u in self._order_of_first_use() if u in self._resident]
        return SwapStats(
            limit_bytes=self.limit_bytes,
            resident=tuple(self.units[u].name for u in resident),
            resident_bytes=sum(self.units[u].prepared_bytes(self.alignment) for u in self._resident),
            arena_bytes=self._capacity,
            calls=self._calls,
            fetched_bytes=self._fetched,
            prefetched=self._prefetched,
            synchronous=self._synchronous,
            held_peak_bytes=self._held_peak,
            order=tuple(self.units[u].name for u in self._order or ()),
        )

    def release(self) -> None:
        """Free everything held on the device: kept units, the arena, fetches in flight."""
        if self._in_use:
            raise VramfxError("cannot release the layer-swap runtime while a module is running")
        self._drop_queue()
        self._arena = None
        self._kept.clear()
        self._kept_bytes = 0
        self._mover.close()

    def homes_changed(self) -> None:
        """Units' home tensors moved (offload/onload): kept copies stay valid, sizes may not."""
        self._needs_plan = True

    def forget(self, unit: Unit) -> None:
        """Drop ``unit``'s kept copy (its home moved)."""
        if self._kept.pop(unit.index, None) is not None:
            self._kept_bytes -= unit.prepared_bytes(self.alignment)
        self._needs_plan = True

    # -- call boundaries -------------------------------------------------------------------------
    def begin_call(self) -> None:
        """The model's forward starts (calls nest: only the outermost counts)."""
        self._depth += 1
        if self._depth > 1:
            return
        self._calls += 1
        self._fetched = self._prefetched = self._synchronous = 0
        if self._order is None:
            self._arena = self._scratch_arena()
            memory = _memory_sampler(self.device) if self.activations_in_limit else None
            self._recorder = Recorder(timed=True, memory=memory)
            return
        if self._needs_plan:
            self._plan()
        self._recorder = Recorder()
        n = len(self._order)
        if (self._cursor + 1) % n:  # the previous call left its cycle early: skip the rest
            self._cursor = (self._cursor // n + 1) * n - 1
            self._drop_stale()
        self._refill()

    def end_call(self, *, failed: bool = False) -> None:
        """The model's forward returned (or raised, when ``failed``)."""
        self._depth -= 1
        if self._depth > 0:
            return
        recorder, self._recorder = self._recorder, None
        if self._order is None:
            self._arena = None  # the first call's scratch arena
        if failed or recorder is None or not recorder.record.order:
            return
        record = recorder.record
        if self._order is None:
            self._seconds = unit_seconds(record)
            self._activation_peak = max(0, record.activation_peak_bytes)
            self._adopt(record)
        elif tuple(record.order) != self._order:
            log.debug("the unit order changed (%d -> %d calls); planning again", len(self._order), len(record.order))
            self._adopt(record)

    # -- serving units ------------------------------------------------------------------------
    def acquire(self, unit: Unit) -> tuple[torch.Tensor, ...]:
        """``unit``'s parameters on the device in the computation dtype, for one forward."""
        start = time.perf_counter()
        if not unit.copies(unit.compute_dtypes):
            held = _Held(unit, tuple(unit.home))
            self._advance(unit)
        elif self._order is None or self._recorder is None or self._synchronous_only:
            held = self._load_in_arena(unit) or self._load_loose(unit)
        elif unit.index in self._resident:
            held = self._from_kept(unit)
            self._advance(unit)
        else:
            held = self._take_queued(unit) or self._load_missed(unit)
        if self._recorder is not None:
            held.position = self._recorder.enter(unit.index, self.held_bytes, time.perf_counter() - start)
        else:
            held.position = -1
        self._in_use.append(held)
        self._note_held()
        self._refill()
        return held.tensors

    def run(self, unit: Unit, fn: Callable[[tuple[torch.Tensor, ...]], Any]) -> Any:
        """``fn(tensors)`` with ``unit``'s parameters on the device; released however it ends."""
        tensors = self.acquire(unit)
        try:
            output = fn(tensors)
        except BaseException:
            self.release_unit(unit)
            raise
        return self.release_unit(unit, output)

    def release_unit(self, unit: Unit, output: Any = None) -> Any:
        """``unit``'s forward returned ``output``; its streamed weights may go.

        Returns ``output``, with tensors that view the arena copied out of it (their block is
        about to be reused).
        """
        for k in range(len(self._in_use) - 1, -1, -1):
            if self._in_use[k].unit is unit:
                held = self._in_use.pop(k)
                break
        else:
            raise VramfxError(f"unit {unit.name!r} was released without being acquired")
        if self._recorder is not None and held.position >= 0:
            self._recorder.exit(held.position, self.held_bytes)
        if held.block is not None:
            output = self._copy_out_of_arena(output)
            self._free_block(held)
        self._loose_bytes -= held.nbytes
        self._refill()
        return output

    # -- planning -----------------------------------------------------------------------------
    def _adopt(self, record: CallRecord) -> None:
        """Make ``record``'s order the one prefetches follow, and plan for it."""
        self._drop_queue()
        self._order = tuple(record.order)
        self._ends = tuple(record.ends)
        self._positions = {}
        for position, u in enumerate(self._order):
            self._positions.setdefault(u, []).append(position)
        self._cursor = -1
        try:
            self._plan()
        except BudgetError:
            self._order = None  # the next call records again
            raise

    def _plan(self) -> None:
        """Choose the kept units and the arena for the recorded order."""
        self._needs_plan = False
        assert self._order is not None
        self._drop_queue()
        streamed = {u for u in self._order if self.units[u].copies(self.units[u].compute_dtypes)}
        if self.limit_bytes is None:
            resident, capacity, synchronous = frozenset(streamed), 0, False
        else:
            resident, capacity, synchronous = self._schedule()
        for u in [u for u in self._kept if u not in resident]:
            self.forget(self.units[u])
        self._needs_plan = False
        self._resident, self._synchronous_only = resident, synchronous
        if capacity != self._capacity or synchronous:
            self._arena = None
        self._capacity = 0 if synchronous else capacity

    def _schedule(self) -> tuple[frozenset[int], int, bool]:
        """Resident units and arena bytes from the planner; or stream-only when nothing fits."""
        assert self._order is not None and self.limit_bytes is not None
        liveness = to_liveness(
            self._order,
            self._ends,
            self.units,
            seconds=self._seconds,
            alignment=self.alignment,
            activation_peak_bytes=self._activation_peak,
            flops_per_s=self.cost_model.compute_flops_per_s,
        )
        try:
            plan = schedule(
                liveness,
                self.limit_bytes,
                cost_model=self.cost_model,
                calls=self.calls,
                alignment=self.alignment,
                margin_bytes=self.reserved_bytes,
            )
        except BudgetError as exc:
            if self.activations_in_limit:
                raise BudgetError(
                    f"{exc} (the module-level path, with activations measured on the first call)",
                    minimum_bytes=exc.minimum_bytes,
                ) from None
            log.info(
                "vram_limit %s holds less than the modules need at once (%s): every module streams "
                "synchronously, one at a time",
                format_bytes(self.limit_bytes),
                format_bytes(exc.minimum_bytes or 0),
            )
            return frozenset(), 0, True
        by_name = {self.units[u].name: u for u in set(self._order)}
        resident = frozenset(by_name[name] for name in plan.resident)
        kept = sum(self.units[u].prepared_bytes(self.alignment) for u in resident)
        capacity = (
            self.limit_bytes
            - self.reserved_bytes
            - kept
            - liveness.activation_peak_bytes
            - liveness.workspace_bytes
        )
        assert capacity >= plan.arena_bytes, "the arena must hold what the plan streams"
        log.info("vramfx layer swap plan:\n%s", plan.summary())
        # More arena than every streamed unit at once would never be used.
        streamed = {u for u in self._order if u not in resident}
        everything = sum(self.units[u].stream_bytes(self.alignment) for u in streamed)
        return resident, min(capacity, everything), False

    def _order_of_first_use(self) -> list[int]:
        seen: dict[int, None] = {}
        for u in self._order or ():
            seen.setdefault(u, None)
        return list(seen)

    # -- fetching -----------------------------------------------------------------------------
    def _load_loose(self, unit: Unit) -> _Held:
        """Copy ``unit`` now into allocations of its own (the first call, or streaming only)."""
        outs = {
            i: torch.empty(unit.slots[i].shape, dtype=unit.compute_dtypes[i], device=self.device)
            for i in unit.copies(unit.compute_dtypes)
        }
        nbytes = unit.stream_bytes()
        self._loose_bytes += nbytes
        try:
            self._load_now(unit, outs)
        except BaseException:
            self._loose_bytes -= nbytes
            raise
        return _Held(unit, self._tensors(unit, outs), nbytes=nbytes)

    def _from_kept(self, unit: Unit) -> _Held:
        """A kept unit: loaded on its first use after planning, cast for each call if needed."""
        kept = self._kept.get(unit.index)
        if kept is None:
            outs = {
                i: torch.empty(unit.slots[i].shape, dtype=unit.prepared_dtypes[i], device=self.device)
                for i in unit.copies(unit.prepared_dtypes)
            }
            self._load_now(unit, outs)
            kept = self._tensors(unit, outs)
            self._kept[unit.index] = kept
            self._kept_bytes += unit.prepared_bytes(self.alignment)
        cast = unit.cast_bytes()
        if not cast:
            return _Held(unit, kept)
        self._loose_bytes += cast
        tensors = tuple(t.to(dtype) for t, dtype in zip(kept, unit.compute_dtypes))
        return _Held(unit, tensors, nbytes=cast)

    def _take_queued(self, unit: Unit) -> _Held | None:
        """The queued copy of ``unit`` (skipping queued units the call passed over), or None."""
        if not any(h.unit is unit for h in self._queue):
            return None
        while self._queue[0].unit is not unit:
            self._discard(self._queue.popleft())
        held = self._queue.popleft()
        try:
            self._mover.finish(held.future)
        except OSError as exc:
            self._free_block(held)
            raise WeightsError(f"reading the weights of {unit.name} failed: {exc}") from exc
        except BaseException:
            self._free_block(held)
            raise
        held.future = None
        self._cursor = held.position
        self._prefetched += 1
        return held

    def _load_missed(self, unit: Unit) -> _Held:
        """``unit`` was not fetched ahead: copy it now, into the arena if room can be made."""
        self._advance(unit)
        return self._load_in_arena(unit) or self._load_loose(unit)

    def _load_in_arena(self, unit: Unit) -> _Held | None:
        """Copy ``unit`` now into an arena block, giving up queued copies for room; None if none."""
        arena = self._ensure_arena()
        if arena is None:
            return None
        offsets, size = unit.layout(unit.compute_dtypes, self.alignment)
        offset = arena.allocate(size)
        while offset is None and self._queue:
            self._discard(self._queue.pop())  # the furthest ahead is needed last
            offset = arena.allocate(size)
        if offset is None:
            return None
        outs = {i: view_bytes(arena.buffer, offset + at, layout) for i, (at, layout) in offsets.items()}
        held = _Held(unit, self._tensors(unit, outs), block=(offset, size))
        try:
            self._load_now(unit, outs)
        except BaseException:
            self._free_block(held)
            raise
        return held

    def _refill(self) -> None:
        """Fetch the units next in the recorded order into free arena blocks, in order."""
        if not self.prefetch or self._recorder is None or self._synchronous_only or self._order is None:
            return
        arena = self._ensure_arena()
        if arena is None:
            return
        n = len(self._order)
        position = self._queue[-1].position + 1 if self._queue else self._cursor + 1
        while position <= self._cursor + n:
            unit = self.units[self._order[position % n]]
            if unit.index in self._resident or not unit.copies(unit.compute_dtypes):
                position += 1
                continue
            offsets, size = unit.layout(unit.compute_dtypes, self.alignment)
            offset = arena.allocate(size)
            if offset is None:
                break
            outs = {i: view_bytes(arena.buffer, offset + at, layout) for i, (at, layout) in offsets.items()}
            held = _Held(unit, self._tensors(unit, outs), block=(offset, size), position=position)
            held.future = self._mover.submit(unit, outs)
            self._fetched += sum(layout.nbytes for _, layout in offsets.values())
            self._queue.append(held)
            position += 1

    def _load_now(self, unit: Unit, outs: dict[int, torch.Tensor]) -> None:
        try:
            self._mover.load(unit, outs)
        except OSError as exc:
            raise WeightsError(f"reading the weights of {unit.name} failed: {exc}") from exc
        self._fetched += sum(t.numel() * t.element_size() for t in outs.values())
        self._synchronous += 1

    def _tensors(self, unit: Unit, outs: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(outs.get(i, home) for i, home in enumerate(unit.home))

    def _scratch_arena(self) -> Arena | None:
        """For the first call: room for two units, so its copies do not churn the allocator.

        Its pages are touched at once, so memory measured during the call counts it whole.
        """
        largest = max((u.stream_bytes(self.alignment) for u in self.units), default=0)
        room = 2 * largest
        if self.limit_bytes is not None:
            room = min(room, self.limit_bytes - self.reserved_bytes)
        if largest == 0 or room < largest:
            return None
        arena = Arena(room, self.device, alignment=self.alignment)
        arena.buffer.zero_()
        return arena

    def _ensure_arena(self) -> Arena | None:
        if self._arena is None and self._capacity > 0:
            self._arena = Arena(self._capacity, self.device, alignment=self.alignment)
        return self._arena

    # -- positions ----------------------------------------------------------------------------
    def _advance(self, unit: Unit) -> None:
        """Move the cursor to ``unit``'s next position in the recorded order, if it has one."""
        positions = self._positions.get(unit.index)
        if self._recorder is None or self._order is None or not positions:
            return
        n = len(self._order)
        cycle, at = divmod(self._cursor, n)
        later = next((p for p in positions if p > at), None)
        self._cursor = cycle * n + later if later is not None else (cycle + 1) * n + positions[0]
        self._drop_stale()

    def _drop_stale(self) -> None:
        """Queued copies for positions the call has passed are not coming: free them."""
        while self._queue and self._queue[0].position <= self._cursor:
            self._discard(self._queue.popleft())

    def _drop_queue(self) -> None:
        while self._queue:
            self._discard(self._queue.pop())

    def _discard(self, held: _Held) -> None:
        if held.future is not None:
            self._mover.drain(held.future)
        self._free_block(held)

    def _free_block(self, held: _Held) -> None:
        if held.block is not None and self._arena is not None:
            self._mover.note_release()
            self._arena.free(*held.block)
        held.block = None

    def _copy_out_of_arena(self, output: Any) -> Any:
        """Outputs that view an arena block (a module returning its weight) get their own memory."""
        arena = self._arena
        if arena is None:
            return output
        leaves = pytree.tree_leaves(output)
        if not any(isinstance(t, torch.Tensor) and arena.owns(t) for t in leaves):
            return output
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if arena.owns(t) else t, output)

    def _note_held(self) -> None:
        self._held_peak = max(self._held_peak, self.held_bytes)


def _memory_sampler(device: torch.device) -> Callable[[], int]:
    """Memory in use on ``device``, as the budget counts it."""
    if device.type == "cuda":
        return lambda: torch.cuda.memory_allocated(device)
    from vramfx.budget import rss_anon_bytes

    return rss_anon_bytes
