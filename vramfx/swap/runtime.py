"""The layer-swap runtime: which units stay on the device, and fetching the others ahead.

One runtime serves every unit of one model. Per call of the model:

- **The first call** streams every unit synchronously (its weights are copied in right before
  its forward and released right after) and records the order units run in, with each one's
  compute time.
- **After it**, the planner (:func:`vramfx.plan.schedule.schedule`, over a Liveness whose
  positions are unit calls) chooses the units kept on the device under the limit, and for the
  others, transfers with a fetch position and a static offset in one arena: a plan checked by
  :func:`vramfx.plan.check.check_plan`, so following it never needs more than the limit.
- **Later calls** follow the plan while units run in the recorded order: each transfer is
  issued to a reader thread at its fetch position, waited for at its first use and dropped
  after its last; at the end of a call the next call's first transfers are issued. A unit that
  is not where the order predicts leaves the plan for the rest of that call: it and the units
  after it are fetched synchronously into free arena space — slower, never a wrong result —
  and the call's order becomes the recorded one, planned anew.

The limit covers what the runtime holds on the device: kept units, the arena, staging and
per-call casts. Weights stored in a dtype narrower than the one they compute in (fp8 storage,
bf16 compute) are moved and held in it — in the arena and kept alike — and each call casts them
up on the device into a static slot of an *upcast region* the plan lays out (one slot per span
of a unit's use, :func:`vramfx.plan.schedule.planned_casts`), as compiled graphs do. A limit
below what one unit needs (``0`` included) streams every unit synchronously, one at a time: the
least any limit can take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.errors import BudgetError, VramfxError, WeightsError
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.plan.schedule import schedule
from vramfx.runtime.engine import view_bytes
from vramfx.swap.arena import Arena, same_memory
from vramfx.swap.mover import Mover
from vramfx.swap.record import CallRecord, Recorder, to_liveness, unit_seconds
from vramfx.swap.units import Unit
from vramfx.util import ALIGNMENT, format_bytes

log = logging.getLogger(__name__)

#: Calls a plan is optimised for, as :func:`vramfx.compile`'s default.
PLANNED_CALLS = 10
#: Block alignment in the arena: what kernels would see in eager.


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
        Bytes of the kept units, and of the planned arena the others stream through.
    calls:
        Calls served so far.
    fetched_bytes:
        Bytes copied to the device during the latest call.
    prefetched, synchronous:
        Unit copies of the latest call that were made ahead, and that the call waited on
        from the start (the first call's, a mispredicted unit's, or every one when nothing
        can be held ahead).
    wait_seconds:
        Seconds the latest call spent waiting for weights: synchronous copies, and copies
        made ahead that had not landed yet when their unit was called.
    held_bytes, held_peak_bytes:
        Bytes the runtime holds on the device now (kept units, the arena, the upcast region,
        copies and casts made off the plan), and the most it has held at once, by its own
        accounting.
    activation_peak_bytes:
        Activations measured on the first call, when the limit covers them (compile's
        fallback); else 0.
    order:
        The recorded order of units (their names), empty before the first call.
    upcast_bytes:
        Bytes of the planned upcast region, where weights held in a narrower dtype than they
        compute in are cast for each call.
    cast_bytes:
        Bytes the latest call's casts wrote (in compute dtypes), on the device.
    """

    limit_bytes: int | None
    resident: tuple[str, ...]
    resident_bytes: int
    arena_bytes: int
    calls: int
    fetched_bytes: int
    prefetched: int
    synchronous: int
    wait_seconds: float
    held_bytes: int
    held_peak_bytes: int
    activation_peak_bytes: int
    order: tuple[str, ...]
    upcast_bytes: int = 0
    cast_bytes: int = 0


@dataclass
class _Held:
    """One unit's computation tensors while it runs."""

    unit: Unit
    tensors: tuple[torch.Tensor, ...]
    nbytes: int = 0  # bytes outside the arena counted while held
    block: tuple[int, int] | None = None  # (offset, nbytes) taken from the arena off the plan
    transfer: int | None = None  # the plan's transfer it came from
    position: int = -1  # its position in the call's record
    cast_end: int | None = None  # its casts view the upcast region, planned free from this position
    in_upcast: bool = False  # its casts view the upcast region (on the plan or off it)


@dataclass
class _Transfer:
    """A plan transfer as the runtime runs it: its units' slots in the arena, its copy."""

    fetch: int
    drop: int
    region: tuple[int, int]  # (offset, nbytes) of its members, back to back
    outs: dict[int, dict[int, torch.Tensor]]  # unit index -> slot index -> view of the arena
    future: Any = None  # the copy in flight, until waited for
    issued: bool = False
    ahead: bool = False  # issued before it was needed
    dropped: bool = False


class SwapRuntime:
    """Serves units their weights on the compute device under a byte limit.

    Parameters
    ----------
    device:
        The computation device.
    limit_bytes:
        Bytes the runtime may hold on the device at once (None: no limit, every unit is kept
        after its first use).
    prefetch:
        Issue each transfer at the plan's fetch position, ahead of its use. ``False`` copies
        each unit when it is called, as the original layer-swap implementation does.
    calls:
        How many calls the plan is optimised for: kept units are loaded once.
    reserved_bytes:
        Bytes of the limit taken by things outside the units (compile's margin, buffers moved
        to the device), so the limit is a whole budget.
    activations_in_limit:
        The limit also covers activations, measured on the first call (compile's fallback).
        A limit that then cannot hold what the units need at once raises BudgetError instead
        of streaming synchronously.
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
        self._seconds: dict[int, float] = {}
        self._activation_peak = 0
        self._plan: Plan | None = None
        self._resident: frozenset[int] = frozenset()
        self._transfers: list[_Transfer] = []
        self._cover: dict[tuple[int, int], int] = {}  # (unit, position) -> transfer
        self._drop_order: list[int] = []  # transfers by drop position
        self._synchronous_only = False
        self._needs_plan = False
        # What is held now.
        self._arena: Arena | None = None
        self._upcast: torch.Tensor | None = None  # the plan's upcast region
        self._cast_at: dict[tuple[int, int], tuple[int, int]] = {}  # (unit, position) -> (offset, end)
        self._kept: dict[int, tuple[torch.Tensor, ...]] = {}
        self._kept_sizes: dict[int, int] = {}  # as counted when kept: homes may move since
        self._kept_bytes = 0
        self._loose_bytes = 0
        self._in_use: list[_Held] = []
        # The call in progress.
        self._depth = 0
        self._recorder: Recorder | None = None
        self._position = 0  # the next position of the recorded order
        self._on_plan = False
        self._next_fetch = 0  # index into the transfers, which are in fetch order
        self._next_drop = 0  # index into _drop_order
        self._calls = 0
        self._fetched = 0
        self._carried = 0  # bytes issued at the end of a call for the next one
        self._prefetched = 0
        self._synchronous = 0
        self._waited = 0.0
        self._cast_written = 0
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
        upcast = self._upcast.nbytes if self._upcast is not None else 0
        return self._kept_bytes + arena + upcast + self._loose_bytes

    def stats(self) -> SwapStats:
        """What is held, and what the latest call did."""
        first_use = dict.fromkeys(self._order or ())
        return SwapStats(
            limit_bytes=self.limit_bytes,
            resident=tuple(self.units[u].name for u in first_use if u in self._resident),
            resident_bytes=sum(self.units[u].prepared_bytes(self.alignment) for u in self._resident),
            arena_bytes=self._plan.arena_bytes if self._plan is not None else 0,
            calls=self._calls,
            fetched_bytes=self._fetched,
            prefetched=self._prefetched,
            synchronous=self._synchronous,
            wait_seconds=self._waited,
            held_bytes=self.held_bytes,
            held_peak_bytes=self._held_peak,
            activation_peak_bytes=self._activation_peak,
            order=tuple(self.units[u].name for u in self._order or ()),
            upcast_bytes=self._plan.upcast_bytes if self._plan is not None else 0,
            cast_bytes=self._cast_written,
        )

    def release(self) -> None:
        """Free everything held on the device: kept units, the arena, copies in flight."""
        if self._in_use:
            raise VramfxError("cannot release the layer-swap runtime while a module is running")
        self._drop_transfers()
        self._arena = self._upcast = None
        self._transfers = []  # their views hold the arena: planned again on the next call
        self._needs_plan = self._order is not None
        self._kept.clear()
        self._kept_sizes.clear()
        self._kept_bytes = 0
        self._mover.close()

    def homes_changed(self) -> None:
        """Units' homes moved (offload/onload): plan again before the next call."""
        self._needs_plan = True

    def forget(self, unit: Unit) -> None:
        """Drop ``unit``'s kept copy (its home moved, or another unit needs the room)."""
        if self._kept.pop(unit.index, None) is not None:
            self._kept_bytes -= self._kept_sizes.pop(unit.index)
        self._needs_plan = True

    # -- call boundaries -------------------------------------------------------------------------
    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def begin_call(self) -> None:
        """The model's forward starts (calls nest: only the outermost counts)."""
        self._depth += 1
        if self._depth > 1:
            return
        self._calls += 1
        self._fetched, self._carried = self._carried, 0
        self._prefetched = self._synchronous = self._cast_written = 0
        self._waited = 0.0
        if self._order is None:
            self._arena = self._scratch_arena()
            self._upcast = self._scratch_upcast() if self._arena is not None else None
            memory = _memory_sampler(self.device) if self.activations_in_limit else None
            self._recorder = Recorder(timed=True, memory=memory)
            return
        if self._needs_plan:
            self._replan()
        self._recorder = Recorder()
        self._position = 0
        self._on_plan = self._plan is not None

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def end_call(self, *, failed: bool = False) -> None:
        """The model's forward returned (or raised, when ``failed``)."""
        self._depth -= 1
        if self._depth > 0:
            return
        recorder, self._recorder = self._recorder, None
        recording = self._order is None
        if recording:
            self._arena = self._upcast = None  # the first call's scratch arena and upcast region
        else:
            self._end_transfers()
        if failed or recorder is None or not recorder.record.order:
            return
        record = recorder.record
        if recording:
            self._seconds = unit_seconds(record)
            self._activation_peak = max(0, record.activation_peak_bytes)
            self._adopt(record)
        elif (tuple(record.order), tuple(record.ends)) != (self._order, self._ends):
            log.debug("the module order changed (%d -> %d calls); planning again", len(self._order), len(record.order))
            self._adopt(record)
        self._issue_first_transfers()

    # -- serving units ------------------------------------------------------------------------
    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def acquire(self, unit: Unit) -> tuple[torch.Tensor, ...]:
        """``unit``'s parameters on the device in the computation dtype, for one forward."""
        start = time.perf_counter()
        position = self._claim_position(unit)
        if not unit.copies(unit.held_dtypes()):
            held = _Held(unit, tuple(unit.home))  # type: ignore[arg-type]
        elif self._recorder is None or self._order is None or self._synchronous_only:
            held = self._load_in_arena(unit) if self._order is None else None
            held = held or self._load_loose(unit)
        elif unit.index in self._resident:
            held = self._from_kept(unit)
        elif position is not None and (unit.index, position) in self._cover:
            held = self._from_plan(unit, position)
        else:
            held = self._load_missed(unit)
        self._upcast_for_call(held, position)
        if self._recorder is not None:
            held.position = self._recorder.enter(unit.index, self.held_bytes, time.perf_counter() - start)
        self._in_use.append(held)
        self._held_peak = max(self._held_peak, self.held_bytes)
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

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def release_unit(self, unit: Unit, output: Any = None) -> Any:
        """``unit``'s forward returned ``output``; its streamed weights may go.

        Returns ``output``, with tensors that view the arena copied out of it (their slots
        are about to be reused).
        """
        for k in range(len(self._in_use) - 1, -1, -1):
            if self._in_use[k].unit is unit:
                held = self._in_use.pop(k)
                break
        else:
            raise VramfxError(f"unit {unit.name!r} was released without being acquired")
        if self._recorder is not None and held.position >= 0:
            self._recorder.exit(held.position, self.held_bytes)
        if held.block is not None or held.transfer is not None or held.in_upcast:
            output = self._copy_out_of_arena(output)
            self._mover.note_release()
        if held.block is not None and self._arena is not None:
            self._arena.free(*held.block)
        if held.transfer is not None and not self._on_plan:
            self._free_transfer_off_plan(held.transfer)
        self._loose_bytes -= held.nbytes
        return output

    # -- planning -----------------------------------------------------------------------------
    def _adopt(self, record: CallRecord) -> None:
        """Make ``record``'s order the one the plan follows, and plan for it."""
        previous = self._order
        self._order, self._ends = tuple(record.order), tuple(record.ends)
        try:
            self._replan()
        except BudgetError:
            self._order = previous  # None after the first call: the next call records again
            raise

    def _replan(self) -> None:
        """Choose the kept units and the transfers for the recorded order."""
        self._needs_plan = False
        self._drop_transfers()
        assert self._order is not None
        by_name = {self.units[u].name: u for u in self._order}
        streamed = {u for u in by_name.values() if self.units[u].copies(self.units[u].kept_dtypes())}
        plan = None
        if self.limit_bytes is None:
            resident = frozenset(streamed)
        else:
            plan = self._schedule()
            resident = frozenset(by_name[n] for n in plan.resident) if plan is not None else frozenset()
        for u in [u for u in self._kept if u not in resident]:
            self.forget(self.units[u])
        self._needs_plan = False
        self._plan, self._resident = plan, resident
        self._synchronous_only = self.limit_bytes is not None and plan is None
        self._arena = self._upcast = None
        self._transfers, self._cover, self._drop_order, self._cast_at = [], {}, [], {}
        if plan is not None and plan.upcast_bytes:
            self._upcast = torch.empty(plan.upcast_bytes, dtype=torch.uint8, device=self.device)
            self._cast_at = {(by_name[c.name], c.position): (c.offset, c.end) for c in plan.casts}
        if plan is not None and plan.arena_bytes:
            self._arena = Arena(plan.arena_bytes, self.device, alignment=self.alignment)
            self._transfers = [self._runnable(t, by_name) for t in plan.transfers]
            self._drop_order = sorted(range(len(self._transfers)), key=lambda k: self._transfers[k].drop)
            for k, t in enumerate(plan.transfers):
                for name in t.names:
                    u = by_name[name]
                    for p in range(t.wait, t.drop):
                        if self._order[p] == u:
                            self._cover[(u, p)] = k

    def _schedule(self) -> Plan | None:
        """The planner's plan for the recorded order; None when nothing but streaming fits."""
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
                # Without prefetch each unit is its own copy, read when it is called.
                coalesce_bytes=4 * 2**20 if self.prefetch else 0,
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
            return None
        log.info("vramfx layer-swap plan:\n%s", plan.summary())
        return plan

    def _runnable(self, transfer: Any, by_name: dict[str, int]) -> _Transfer:
        """A plan transfer with views of its members' slots in the arena."""
        assert self._arena is not None
        outs = {}
        for name, offset in zip(transfer.names, transfer.offsets):
            unit = self.units[by_name[name]]
            layout, _ = unit.layout(unit.held_dtypes(), self.alignment)
            outs[unit.index] = {i: view_bytes(self._arena.buffer, offset + at, lay) for i, (at, lay) in layout.items()}
        start = transfer.offsets[0]
        stop = transfer.offsets[-1] + transfer.sizes[-1]
        return _Transfer(transfer.fetch, transfer.drop, (start, stop - start), outs)

    # -- following the plan ---------------------------------------------------------------------
    def _claim_position(self, unit: Unit) -> int | None:
        """``unit``'s position when the call still follows the plan; else the plan is left."""
        if not self._on_plan or self._recorder is None:
            return None
        assert self._order is not None
        p = self._position
        if p < len(self._order) and self._order[p] == unit.index and self._advance_plan(p):
            self._position += 1
            return p
        self._leave_plan()
        return None

    def _advance_plan(self, position: int) -> bool:
        """Run the plan's drops and fetches up to ``position`` (drops first).

        False, doing nothing more, when a transfer due to be dropped is still in use: the call
        nests its modules otherwise than the recorded one, and its slots must not be reused.
        The same holds for a cast slot held past its planned span.
        """
        if any(h.cast_end is not None and h.cast_end <= position for h in self._in_use):
            return False
        while self._next_drop < len(self._drop_order):
            k = self._drop_order[self._next_drop]
            t = self._transfers[k]
            if t.drop > position:
                break
            if any(h.transfer == k for h in self._in_use):
                return False
            if t.issued and not t.dropped:
                self._drop(t)
            self._next_drop += 1
        if not self.prefetch:
            return True
        while self._next_fetch < len(self._transfers) and self._transfers[self._next_fetch].fetch <= position:
            self._issue(self._transfers[self._next_fetch], ahead=True)
            self._next_fetch += 1
        return True

    def _from_plan(self, unit: Unit, position: int) -> _Held:
        k = self._cover[(unit.index, position)]
        t = self._transfers[k]
        if not t.issued:  # no prefetch: read it now
            self._issue(t, ahead=False)
        if t.future is not None:
            start = time.perf_counter()
            try:
                self._mover.finish(t.future)
            except OSError as exc:
                raise WeightsError(f"reading the weights of {unit.name} failed: {exc}") from exc
            finally:
                t.future = None
                self._waited += time.perf_counter() - start
        if t.ahead:
            self._prefetched += 1
        outs = t.outs[unit.index]
        return _Held(unit, self._tensors(unit, outs), transfer=k)

    def _issue(self, t: _Transfer, *, ahead: bool) -> None:
        jobs = [(self.units[u], outs) for u, outs in t.outs.items()]
        if ahead:
            t.future = self._mover.submit(jobs)
            self._fetched += sum(o.nbytes for _, outs in jobs for o in outs.values())
        else:
            for unit, outs in jobs:
                self._load_now(unit, outs)
        t.issued, t.ahead, t.dropped = True, ahead, False

    def _drop(self, t: _Transfer) -> None:
        if t.future is not None:
            self._mover.drain(t.future)
            t.future = None
        t.dropped = True

    def _drop_transfers(self) -> None:
        """Drop every transfer issued and not dropped (waiting out copies in flight)."""
        for t in self._transfers:
            if t.issued and not t.dropped:
                self._drop(t)
            t.issued = False
        self._next_fetch = self._next_drop = 0

    def _end_transfers(self) -> None:
        """The call is over: every transfer is done with; the arena is the plan's again."""
        self._drop_transfers()
        if not self._on_plan and self._arena is not None:
            self._arena.reset()
        self._on_plan = False

    def _issue_first_transfers(self) -> None:
        """Start the next call's first transfers now: the arena is empty between calls."""
        if not self.prefetch:
            return
        fetched = self._fetched
        while self._next_fetch < len(self._transfers) and self._transfers[self._next_fetch].fetch == 0:
            self._issue(self._transfers[self._next_fetch], ahead=True)
            self._next_fetch += 1
        self._fetched, self._carried = fetched, self._fetched - fetched  # they count for the next call

    def _leave_plan(self) -> None:
        """The call left the recorded order: copies not in use are dropped; the arena goes first fit."""
        self._on_plan = False
        in_use = {h.transfer for h in self._in_use if h.transfer is not None}
        occupied = []
        for k, t in enumerate(self._transfers):
            if t.issued and not t.dropped:
                if k in in_use:
                    occupied.append(t.region)
                else:
                    self._drop(t)
        if self._arena is not None:
            self._arena.reset(occupied)

    def _free_transfer_off_plan(self, k: int) -> None:
        """Off the plan, a transfer's slots return to the arena once none of its units runs."""
        t = self._transfers[k]
        if t.dropped or any(h.transfer == k for h in self._in_use):
            return
        t.dropped = True
        if self._arena is not None:
            self._arena.free(*t.region)

    # -- fetching off the plan ------------------------------------------------------------------
    def _load_missed(self, unit: Unit) -> _Held:
        """A unit off the plan: copy it now into free arena space, else into its own memory.

        Kept units not in use make room for it when the limit would be passed (they are loaded
        again when next called).
        """
        held = self._load_in_arena(unit)
        if held is not None:
            return held
        if self.limit_bytes is not None:
            room = self.limit_bytes - self.reserved_bytes - self._activation_peak - unit.stream_bytes() - unit.cast_bytes()
            in_use = {h.unit.index for h in self._in_use}
            for u in [u for u in reversed(self._kept) if u not in in_use]:
                if self.held_bytes <= room:
                    break
                self.forget(self.units[u])
        return self._load_loose(unit)

    def _load_in_arena(self, unit: Unit) -> _Held | None:
        """Copy ``unit`` now into a free arena block (first fit); None if no block is free."""
        arena = self._arena
        if arena is None:
            return None
        offsets, size = unit.layout(unit.held_dtypes(), self.alignment)
        offset = arena.allocate(size)
        if offset is None:
            return None
        outs = {i: view_bytes(arena.buffer, offset + at, layout) for i, (at, layout) in offsets.items()}
        try:
            self._load_now(unit, outs)
        except BaseException:
            arena.free(offset, size)
            raise
        return _Held(unit, self._tensors(unit, outs), block=(offset, size))

    def _load_loose(self, unit: Unit) -> _Held:
        """Copy ``unit`` now into allocations of its own, in the compute dtypes (streaming only, or
        no arena room): the least memory a call of it can take."""
        outs = {
            i: torch.empty(unit.slots[i].shape, dtype=unit.compute_dtypes[i], device=self.device)
            for i in unit.copies(unit.held_dtypes())
        }
        nbytes = sum(t.nbytes for t in outs.values())
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
            dtypes = unit.kept_dtypes()
            outs = {
                i: torch.empty(unit.slots[i].shape, dtype=dtypes[i], device=self.device) for i in unit.copies(dtypes)
            }
            self._load_now(unit, outs)
            kept = self._tensors(unit, outs)
            self._kept[unit.index] = kept
            self._kept_sizes[unit.index] = unit.prepared_bytes(self.alignment)
            self._kept_bytes += self._kept_sizes[unit.index]
        return _Held(unit, kept)

    def _upcast_for_call(self, held: _Held, position: int | None) -> None:
        """Cast ``held``'s tensors stored in another dtype to their compute dtypes, on the device.

        On the plan they land in the unit's slot of the upcast region; off it, at the start of
        the region when no unit running views it, else in allocations counted until the unit
        returns.
        """
        unit = held.unit
        dtypes = unit.compute_dtypes
        cast = [i for i, t in enumerate(held.tensors) if t.dtype != dtypes[i]]
        if not cast:
            return
        layout, size = unit.cast_layout(self.alignment)
        planned = self._cast_at.get((unit.index, position)) if position is not None and self._on_plan else None
        if planned is None and not self._on_plan and self._upcast_free(size):
            planned = (0, None)  # off the plan, an idle region serves one unit at a time
        if planned is not None and self._upcast is not None:
            offset, held.cast_end = planned
            held.in_upcast = True
            outs = {i: view_bytes(self._upcast, offset + layout[i][0], layout[i][1]) for i in cast}
        else:
            outs = {i: torch.empty(unit.slots[i].shape, dtype=dtypes[i], device=self.device) for i in cast}
            nbytes = sum(t.nbytes for t in outs.values())
            held.nbytes += nbytes
            self._loose_bytes += nbytes
        for i, out in outs.items():
            out.detach().copy_(held.tensors[i])  # runs on the compute device, after the copy it reads
            self._cast_written += out.nbytes
        held.tensors = tuple(
            unit.slots[i].like_parameter(outs[i]) if i in outs else t for i, t in enumerate(held.tensors)
        )

    def _upcast_free(self, nbytes: int) -> bool:
        """The upcast region is at least ``nbytes`` and no running unit views it."""
        region = self._upcast
        return region is not None and nbytes <= region.numel() and not any(h.in_upcast for h in self._in_use)

    def _load_now(self, unit: Unit, outs: dict[int, torch.Tensor]) -> None:
        start = time.perf_counter()
        try:
            self._mover.load(unit, outs)
        except OSError as exc:
            raise WeightsError(f"reading the weights of {unit.name} failed: {exc}") from exc
        finally:
            self._waited += time.perf_counter() - start
        self._fetched += sum(unit.slots[i].nbytes(unit.held_dtype(i)) for i in outs)  # what crossed the link
        self._synchronous += 1

    def _tensors(self, unit: Unit, outs: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The op's tensors: the copies, else the homes, requiring grad as the parameters do."""
        return tuple(
            unit.slots[i].like_parameter(outs[i]) if i in outs else home  # type: ignore[misc]
            for i, home in enumerate(unit.home)
        )

    def _scratch_arena(self) -> Arena | None:
        """For the first call: room for two units, so its copies do not churn the allocator.

        Its pages are touched at once, so memory measured during the call counts it whole.
        """
        largest = max((u.stream_bytes(self.alignment) for u in self.units), default=0)
        room = 2 * largest
        if self.limit_bytes is not None:  # a unit's casts are made beside it
            cast = max((u.cast_bytes(self.alignment) for u in self.units), default=0)
            room = min(room, self.limit_bytes - self.reserved_bytes - cast)
        if largest == 0 or room < largest:
            return None
        arena = Arena(room, self.device, alignment=self.alignment)
        arena.buffer.zero_()
        return arena

    def _scratch_upcast(self) -> torch.Tensor | None:
        """For the first call: room for the largest unit's casts, one unit at a time, touched at once
        like the scratch arena (casts made in memory of their own would churn the allocator, and
        memory it keeps after their frees would be measured as activations)."""
        cast = max((u.cast_bytes(self.alignment) for u in self.units), default=0)
        return torch.zeros(cast, dtype=torch.uint8, device=self.device) if cast else None

    def _copy_out_of_arena(self, output: Any) -> Any:
        """Outputs that view the arena or the upcast region (a module returning its weight) get
        their own memory."""
        buffers = [b for b in (self._arena.buffer if self._arena is not None else None, self._upcast) if b is not None]
        if not buffers:
            return output

        def owned(t: torch.Tensor) -> bool:
            return any(same_memory(t, b) for b in buffers)

        if not any(isinstance(t, torch.Tensor) and owned(t) for t in pytree.tree_leaves(output)):
            return output
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if owned(t) else t, output)


def _memory_sampler(device: torch.device) -> Callable[[], int]:
    """Memory in use on ``device``, as the budget counts it."""
    if device.type == "cuda":
        return lambda: torch.cuda.memory_allocated(device)
    from vramfx.budget import rss_anon_bytes

    return rss_anon_bytes
