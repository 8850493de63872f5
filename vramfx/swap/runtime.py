"""The layer-swap runtime: the module front end of the engine compiled graphs run on.

One runtime serves every unit (wrapped module) of one model, through one
:class:`~vramfx.runtime.engine.Engine` (a reader thread on CPU, a copy stream and staging ring on
CUDA). Per call of the model:

- **The first call** records the order units run in, with each one's FLOPs: every unit's weights
  are loaded synchronously (:meth:`Engine.load_now`) into a small scratch arena.
- **After it**, the planner (:func:`vramfx.plan.schedule.schedule`, over a Liveness whose
  positions are unit calls and whose weights are the units' tensors) chooses the weights kept on
  the device under the limit, and for the others transfers with fetch, wait and drop positions
  and static arena offsets: a Plan, checked like every plan.
- **Later calls** follow the plan while units run in the recorded order: when a unit is called at
  position ``p``, the plan's steps up to ``p`` run on the engine (drops, fetches ahead, waits,
  casts), exactly as a compiled graph's nodes run them, and the unit gets the views they return.
  At the end of a call the next call's first transfers are fetched.
- **A unit not where the order predicts** leaves the plan for the rest of the call: copies not
  in use are dropped, and it and the units after it are loaded synchronously into free arena
  bytes (or memory of their own) — slower, never a wrong result. The call's order then becomes
  the recorded one, planned anew.

The limit covers what the engine holds: kept weights, the arena, the upcast region (weights
held in a narrower dtype than they compute in are cast there per call) and loads made off the
plan. A limit below what the units need at once (``0`` included) loads every unit synchronously,
one at a time, into memory of its own: the least any limit can take. Calls are serialised: one
thread at a time runs the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.errors import BudgetError, VramfxError
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan, Prediction, Step
from vramfx.plan.schedule import schedule
from vramfx.runtime import make_engine
from vramfx.runtime.engine import Engine, Loaded, ResidentStore, layout
from vramfx.storage.converted import ConvertedSource, serve_converted
from vramfx.storage.host import HostSource
from vramfx.storage.ref import WeightRef
from vramfx.swap.record import CallRecord, Recorder, to_liveness
from vramfx.swap.units import Unit
from vramfx.util import ALIGNMENT, format_bytes

log = logging.getLogger(__name__)

#: Calls a plan is optimised for, as :func:`vramfx.compile`'s default.
PLANNED_CALLS = 10
#: Without a limit, weights are kept for every later call: loading one costs nothing per call.
KEPT_FOR_GOOD = 2**31


@dataclass(frozen=True)
class SwapStats:
    """What a layer-swap runtime holds, and what its latest call did.

    Attributes
    ----------
    limit_bytes:
        The limit over the weights it holds on the device (None: no limit).
    resident:
        Units whose weights the plan keeps on the device, in order of first use.
    resident_bytes, arena_bytes:
        Bytes of the kept weights, and of the planned arena the others stream through.
    streamed_bytes:
        Bytes the plan fetches on every call (the weights it does not keep).
    calls:
        Calls served so far.
    fetched_bytes:
        Bytes copied to the device during the latest call (in the dtypes they are held in).
    prefetched, synchronous:
        Units of the latest call whose weights were fetched ahead, and units the call waited
        on from the start (the first call's, a mispredicted unit's, every one without prefetch
        or when nothing can be held ahead).
    wait_seconds:
        Seconds the latest call spent waiting for weights: synchronous loads, and copies made
        ahead that had not landed yet when their unit was called.
    held_bytes, held_peak_bytes:
        Bytes the runtime holds on the device now (kept weights, the arena, the upcast region,
        loads off the plan), and the most it has held at once, by its own accounting.
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
    streamed_bytes: int = 0


@dataclass
class _Planned:
    """One engine and the plan it runs: for the recorded order, or (no order yet) the recording."""

    engine: Engine
    weights: dict[int, tuple[WeightRef, ...]]  # unit index -> the weights it copies
    plan: Plan | None = None  # None: recording, or nothing fits and every unit loads synchronously
    steps: tuple[Step, ...] = ()
    transfer_bytes: dict[int, int] = field(default_factory=dict)  # transfer id -> bytes it copies
    casts: dict[tuple[str, int], int] = field(default_factory=dict)  # (name, position) -> cast index


@dataclass
class _Held:
    """One unit's tensors while it runs, and what they hold of the engine."""

    unit: Unit
    tensors: tuple[torch.Tensor, ...]
    transfers: frozenset[int] = frozenset()
    cast_end: int | None = None  # its casts' upcast slots are planned free from this position
    loaded: Loaded | None = None
    position: int = -1


@dataclass
class _Call:
    """The call in progress: how far it followed the plan, and what the steps provide."""

    recorder: Recorder
    on_plan: bool
    position: int = 0  # the next position of the recorded order
    next_step: int = 0
    stored: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # name -> (view, transfer)
    cast: dict[str, tuple[torch.Tensor, int, int]] = field(default_factory=dict)  # name -> (view, end, transfer)
    in_use: list[_Held] = field(default_factory=list)


@dataclass
class _Counts:
    """What the latest call did, and what the runtime held at most."""

    calls: int = 0
    fetched: int = 0
    prefetched: int = 0
    synchronous: int = 0
    waited: float = 0.0
    cast: int = 0
    held_peak: int = 0


class SwapRuntime:
    """Serves units their weights on the compute device under a byte limit, through one engine.

    Parameters
    ----------
    device:
        The computation device.
    limit_bytes:
        Bytes the runtime may hold on the device at once (None: no limit, every weight is kept
        after the first call).
    prefetch:
        Fetch each transfer at the plan's fetch position, ahead of its use. ``False`` copies
        each unit's weights when it is called, as the original layer-swap implementation does.
    calls:
        How many calls the plan is optimised for: kept weights are loaded once.
    reserved_bytes:
        Bytes of the limit taken by things outside the units (compile's margin, buffers moved
        to the device), so the limit is a whole budget.
    activations_in_limit:
        The limit also covers activations, measured on the first call (compile's fallback).
        A limit that then cannot hold what the units need at once raises BudgetError instead
        of loading every unit synchronously.
    bypass_page_cache:
        Read DiskMap weights with ``O_DIRECT``.
    cost_model:
        What plans assume; :meth:`CostModel.for_device` by default, so plans are reproducible.
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
        cost_model: CostModel | None = None,
    ) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self.prefetch = prefetch
        self.calls = calls
        self.reserved_bytes = reserved_bytes
        self.activations_in_limit = activations_in_limit
        self.bypass_page_cache = bypass_page_cache
        self.cost_model = cost_model or CostModel.for_device(device)
        self.alignment = ALIGNMENT.get(device.type, 64)
        self.units: list[Unit] = []
        self._lock = threading.RLock()
        self._store = ResidentStore()
        self._record: CallRecord | None = None  # the recorded order, once a call completed
        self._planned: _Planned | None = None
        self._stale = True  # units or their homes changed: bind and plan again before the next call
        self._carried: set[int] = set()  # transfers the previous call fetched for the next one
        self._call: _Call | None = None
        self._outside: list[_Held] = []  # units running outside any call of the model
        self._fetched_now: set[int] = set()  # transfers this call fetched at their wait, not ahead
        self._unit_flops: dict[int, float] = {}  # per unit, FLOPs of one call of it, as first recorded
        self._depth = 0
        self._counts = _Counts()

    def add(self, unit: Unit) -> Unit:
        """Serve ``unit`` from now on."""
        with self._lock:
            unit.index = len(self.units)
            self.units.append(unit)
            self._stale = True
        return unit

    # -- what it holds -------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes of weights on the device now, by the runtime's own accounting."""
        return self._planned.engine.held_bytes if self._planned is not None else 0

    def stats(self) -> SwapStats:
        """What is held, and what the latest call did."""
        record, planned, counts = self._record, self._planned, self._counts
        plan = planned.plan if planned is not None else None
        order = tuple(dict.fromkeys(record.order)) if record is not None else ()
        kept = set(plan.resident) if plan is not None else set()
        resident = tuple(
            self.units[u].name for u in order
            if planned is not None and planned.weights.get(u) and all(r.name in kept for r in planned.weights[u])
        )
        return SwapStats(
            limit_bytes=self.limit_bytes,
            resident=resident,
            resident_bytes=plan.resident_bytes if plan is not None else 0,
            arena_bytes=plan.arena_bytes if plan is not None else 0,
            calls=counts.calls,
            fetched_bytes=counts.fetched,
            prefetched=counts.prefetched,
            synchronous=counts.synchronous,
            wait_seconds=counts.waited,
            held_bytes=self.held_bytes,
            held_peak_bytes=counts.held_peak,
            activation_peak_bytes=record.activation_peak_bytes if record is not None else 0,
            order=tuple(self.units[u].name for u in record.order) if record is not None else (),
            upcast_bytes=plan.upcast_bytes if plan is not None else 0,
            cast_bytes=counts.cast,
            streamed_bytes=plan.streamed_bytes if plan is not None else 0,
        )

    def release(self) -> None:
        """Free everything held on the device: kept weights, the arena, copies in flight."""
        with self._lock:
            if self._call is not None and self._call.in_use:
                raise VramfxError("cannot release the layer-swap runtime while a module is running")
            if self._planned is not None:
                self._planned.engine.deactivate()
            self._store.clear()
            self._carried.clear()

    def homes_changed(self) -> None:
        """Units' homes moved (offload/onload): bind and plan again before the next call."""
        with self._lock:
            self.release()
            self._stale = True

    def forget(self, unit: Unit) -> None:
        """``unit``'s home moved: drop what is kept of it, and bind and plan again."""
        self.homes_changed()

    # -- call boundaries -------------------------------------------------------------------------
    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def begin_call(self) -> None:
        """The model's forward starts (calls nest: only the outermost counts)."""
        self._lock.acquire()
        self._depth += 1
        if self._depth > 1:
            return
        try:
            planned = self._ready()
            self._counts = _Counts(calls=self._counts.calls + 1, held_peak=self._counts.held_peak)
            self._counts.fetched = sum(planned.transfer_bytes[t] for t in self._carried)
            recording = self._record is None
            memory = _memory_sampler(self.device) if recording and self.activations_in_limit else None
            recorder = Recorder(count_flops=recording, memory=memory, held_bytes=self.held_bytes)
            self._call = _Call(recorder, on_plan=planned.plan is not None)
            self._fetched_now = set()
            recorder.start()
        except BaseException:
            self._depth -= 1
            self._lock.release()
            raise

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def end_call(self, *, failed: bool = False) -> None:
        """The model's forward returned (or raised, when ``failed``)."""
        self._depth -= 1
        if self._depth > 0:
            self._lock.release()
            return
        call, self._call = self._call, None
        try:
            if call is None:
                return
            call.recorder.stop()
            self._finish(call, failed)
        finally:
            self._lock.release()

    def _finish(self, call: _Call, failed: bool) -> None:
        """Drop what the call left fetched; on success adopt its order and fetch the next call's first."""
        planned = self._planned
        assert planned is not None
        engine = planned.engine
        if failed:
            engine.abort()  # its copies are waited out; the next call starts clean
            self._carried.clear()
            return
        if call.on_plan and planned.plan is not None:
            self._advance(call, planned.plan.num_positions)
        for t in list(engine.pending):
            engine.drop(t)
        record = call.recorder.record
        if record.order and (
            self._record is None or (record.order, record.ends) != (self._record.order, self._record.ends)
        ):
            if self._record is None:
                self._unit_flops = _flops_per_unit(record)
            else:
                log.debug("the module order changed (%d -> %d calls); planning again", len(self._record.order),
                          len(record.order))
                record.flops = [self._unit_flops.get(u, 0.0) for u in record.order]
            self._adopt(record)
        self._fetch_ahead_for_next_call()

    # -- serving units ------------------------------------------------------------------------
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
    def acquire(self, unit: Unit) -> tuple[torch.Tensor, ...]:
        """``unit``'s parameters on the device in the computation dtype, for one forward.

        The runtime's lock is held from here to :meth:`release_unit`: one thread at a time.
        """
        self._lock.acquire()
        try:
            call = self._call
            planned = self._planned if call is not None else self._ready()  # a call made it ready
            assert planned is not None
            position = self._claim(call, unit) if call is not None else None
            if position is not None:
                held = self._from_plan(call, unit, position)  # type: ignore[arg-type]
            else:
                held = self._load(unit)
            if call is not None:
                held.position = call.recorder.enter(unit.index, self.held_bytes)
                call.in_use.append(held)
            else:
                self._outside.append(held)
            self._counts.held_peak = max(self._counts.held_peak, planned.engine.held_bytes)
            return held.tensors
        except BaseException:
            self._lock.release()
            raise

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def release_unit(self, unit: Unit, output: Any = None) -> Any:
        """``unit``'s forward returned ``output``; its streamed weights may go.

        Returns ``output``, with tensors that view the engine's memory copied out of it (their
        bytes are about to be reused).
        """
        try:
            call = self._call
            in_use = call.in_use if call is not None else self._outside
            k = next((k for k in range(len(in_use) - 1, -1, -1) if in_use[k].unit is unit), None)
            if k is None:
                raise VramfxError(f"unit {unit.name!r} was released without being acquired")
            held = in_use.pop(k)
            if call is not None and held.position >= 0:
                call.recorder.exit(held.position, self.held_bytes)
            planned = self._planned
            assert planned is not None
            engine = planned.engine
            if held.loaded is not None or held.transfers or held.cast_end is not None:
                output = _copy_out(output, engine)
            if held.loaded is not None:
                engine.unload(held.loaded)
            if call is not None and not call.on_plan:
                for t in held.transfers:
                    if t in engine.pending and not any(t in h.transfers for h in call.in_use):
                        self._drop(call, t)
            return output
        finally:
            self._lock.release()

    # -- planning -----------------------------------------------------------------------------
    def _ready(self) -> _Planned:
        """The engine for the next call, bound and planned if anything changed, and active."""
        if self._stale or self._planned is None:
            self._stale = False
            self._replan()
        planned = self._planned
        assert planned is not None
        planned.engine.activate()
        return planned

    def _adopt(self, record: CallRecord) -> None:
        """Make ``record``'s order the one the plan follows, and plan for it."""
        previous = self._record
        self._record = record
        try:
            self._replan()
        except BudgetError:
            self._record = previous  # None after the first call: the next call records again
            self._stale = True
            raise

    def _replan(self) -> None:
        """Bind every unit's weights and plan them for the recorded order (or the recording)."""
        if self._planned is not None:
            self._planned.engine.deactivate()
        self._carried.clear()
        weights = {u.index: bind(u) for u in self.units}
        refs = {ref.name: ref for unit_refs in weights.values() for ref in unit_refs}
        plan = self._schedule(weights) if self._record is not None else None
        engine_plan = plan if plan is not None else self._scratch_plan(weights)
        engine = make_engine(engine_plan, refs, self.device, self._store, bypass_page_cache=self.bypass_page_cache)
        planned = _Planned(engine, weights, plan)
        if plan is not None:
            planned.steps = plan.steps
            planned.casts = {(c.name, c.position): k for k, c in enumerate(plan.casts)}
            planned.transfer_bytes = {t.id: t.nbytes for t in plan.transfers}
        self._planned = planned

    def _schedule(self, weights: dict[int, tuple[WeightRef, ...]]) -> Plan | None:
        """The planner's plan for the recorded order; None when nothing but synchronous loads fit."""
        assert self._record is not None
        liveness = to_liveness(
            self._record,
            weights,
            [u.name for u in self.units],
            activation_peak_bytes=max(0, self._record.activation_peak_bytes) if self.activations_in_limit else 0,
            workspace_bytes=max((_transient_bytes(r, self.device) for rs in weights.values() for r in rs), default=0),
            device=self.device,
        )
        limit, calls = self.limit_bytes, self.calls
        if limit is None:  # room for every weight, kept for good: the planner keeps them all
            limit = self.reserved_bytes + 2 * (
                liveness.weight_bytes + sum(w.compute_nbytes for w in liveness.weights)
                + liveness.activation_peak_bytes + liveness.workspace_bytes
            ) + self.alignment * (2 * len(liveness.weights) + 2)
            calls = KEPT_FOR_GOOD
        try:
            plan = schedule(
                liveness,
                limit,
                cost_model=self.cost_model,
                calls=calls,
                alignment=self.alignment,
                margin_bytes=self.reserved_bytes,
                # Without prefetch each weight is its own copy, read when its unit is called.
                coalesce_bytes=4 * 2**20 if self.prefetch else 0,
            )
        except BudgetError as exc:
            if self.activations_in_limit:
                raise BudgetError(
                    f"{exc} (the module-level path, with activations measured on the first call)",
                    minimum_bytes=exc.minimum_bytes,
                ) from None
            log.info(
                "vram_limit %s holds less than the modules need at once (%s): every module loads "
                "synchronously, one at a time",
                format_bytes(limit),
                format_bytes(exc.minimum_bytes or 0),
            )
            return None
        if log.isEnabledFor(logging.INFO):
            log.info("vramfx layer-swap plan:\n%s", plan.summary())
        return plan

    def _scratch_plan(self, weights: dict[int, tuple[WeightRef, ...]]) -> Plan:
        """No transfers, and an arena for the loads of the recording call: two of the largest
        units (so its loads do not churn the allocator), within the limit; none without room."""
        largest = max((layout(refs, self.alignment)[2] for refs in weights.values()), default=0)
        room = 2 * largest
        if self.limit_bytes is not None:
            room = min(room, self.limit_bytes - self.reserved_bytes)
        if self._record is not None or room < largest:
            room = 0  # nothing fits ahead: each unit in memory of its own, one at a time
        return empty_plan(max(0, room), self.alignment, self.limit_bytes or 0)

    # -- following the plan ---------------------------------------------------------------------
    def _claim(self, call: _Call, unit: Unit) -> int | None:
        """``unit``'s position when the call still follows the plan; else the plan is left."""
        record = self._record
        if not call.on_plan or record is None:
            return None
        p = call.position
        if p < len(record.order) and record.order[p] == unit.index and self._advance(call, p):
            call.position += 1
            return p
        self._leave_plan(call)
        return None

    def _advance(self, call: _Call, position: int) -> bool:
        """Run the plan's steps up to ``position``, in the plan's order (drops, fetches, waits, casts).

        False, doing nothing more, when a step would reuse memory still in use: the call nests
        its modules otherwise than the recorded one (a transfer due to be dropped, or an upcast
        slot due to be reused, is still held by a running unit).
        """
        planned = self._planned
        assert planned is not None and planned.plan is not None
        engine, steps = planned.engine, planned.steps
        if any(h.cast_end is not None and h.cast_end <= position for h in call.in_use):
            return False
        while call.next_step < len(steps) and steps[call.next_step].position <= position:
            step = steps[call.next_step]
            if step.op == "drop":
                if any(step.transfer in h.transfers for h in call.in_use):
                    return False
                if step.transfer in engine.pending:
                    self._drop(call, step.transfer)
            elif step.op == "fetch":
                if self.prefetch and step.transfer not in engine.pending:
                    self._fetch(step.transfer, ahead=True)
            elif step.op == "wait":
                if step.transfer not in engine.pending:
                    self._fetch(step.transfer, ahead=False)
                start = time.perf_counter()
                views = engine.wait(step.transfer)
                self._counts.waited += time.perf_counter() - start
                for name, view in zip(step.names, views):
                    call.stored[name] = (view, step.transfer)
            else:
                (name,) = step.names
                index = planned.casts[(name, step.position)]
                stored = call.stored[name][0] if step.transfer >= 0 else engine.resident(name)
                call.cast[name] = (engine.cast(index, stored), planned.plan.casts[index].end, step.transfer)
                self._counts.cast += step.nbytes
            call.next_step += 1
        return True

    def _from_plan(self, call: _Call, unit: Unit, position: int) -> _Held:
        """The unit's tensors from what the plan's steps provided."""
        planned = self._planned
        assert planned is not None and planned.plan is not None
        engine = planned.engine
        provided: dict[str, torch.Tensor] = {}
        transfers: set[int] = set()  # what the unit reads in the arena while it runs
        fetched: set[int] = set()  # what its weights came through, cast or not
        cast_end = None
        for ref in planned.weights[unit.index]:
            cast = call.cast.get(ref.name)
            if cast is not None and cast[1] > position:
                provided[ref.name] = cast[0]
                cast_end = cast[1] if cast_end is None else max(cast_end, cast[1])
                fetched.add(cast[2])
            elif ref.name in call.stored:
                provided[ref.name], t = call.stored[ref.name]
                transfers.add(t)
                fetched.add(t)
            else:
                provided[ref.name] = engine.resident(ref.name)
        fetched.discard(-1)  # a cast of a kept weight
        if fetched & self._fetched_now:
            self._counts.synchronous += 1
        elif fetched:
            self._counts.prefetched += 1
        return self._held(unit, provided, transfers=frozenset(transfers), cast_end=cast_end)

    def _fetch(self, transfer: int, *, ahead: bool) -> None:
        planned = self._planned
        assert planned is not None and planned.plan is not None
        planned.engine.fetch(transfer)
        self._counts.fetched += planned.transfer_bytes[transfer]
        if ahead:
            self._fetched_now.discard(transfer)
        else:
            self._fetched_now.add(transfer)

    def _drop(self, call: _Call, transfer: int) -> None:
        planned = self._planned
        assert planned is not None
        planned.engine.drop(transfer)
        for name in [n for n, (_, t) in call.stored.items() if t == transfer]:
            del call.stored[name]

    def _leave_plan(self, call: _Call) -> None:
        """The call left the recorded order: copies no running unit holds are dropped."""
        call.on_plan = False
        planned = self._planned
        assert planned is not None
        for t in list(planned.engine.pending):
            if not any(t in h.transfers for h in call.in_use):
                self._drop(call, t)

    def _fetch_ahead_for_next_call(self) -> None:
        """Start the next call's first transfers now: nothing holds the arena between calls."""
        planned = self._planned
        self._fetched_now = set()
        if not self.prefetch or planned is None or planned.plan is None:
            return
        planned.engine.activate()
        for step in planned.steps:
            if step.position > 0:
                break
            if step.op == "fetch":
                planned.engine.fetch(step.transfer)
                self._carried.add(step.transfer)

    # -- loading off the plan -------------------------------------------------------------------
    def _load(self, unit: Unit) -> _Held:
        """Load ``unit`` now, off the plan: into free arena bytes, else memory of its own.

        Kept weights no running unit uses make room for it when the limit would be passed (they
        are loaded again when the next call activates the plan).
        """
        planned = self._planned
        assert planned is not None
        engine = planned.engine
        names = [ref.name for ref in planned.weights[unit.index]]
        if not names:
            return self._held(unit, {})
        start = time.perf_counter()
        loaded = engine.load_now(names, own_memory=False)
        if loaded is None:
            need = engine.load_bytes(names)
            if self.limit_bytes is not None and engine.held_bytes + need > self.limit_bytes - self.reserved_bytes:
                engine.release_arena()  # off the plan and empty: its memory goes to this load
            self._make_room(engine, need, keep=set(names))
            loaded = engine.load_now(names)
        self._counts.waited += time.perf_counter() - start
        assert loaded is not None
        self._counts.fetched += loaded.stored_bytes
        self._counts.cast += sum(
            math.prod(r.shape) * r.compute_dtype.itemsize for r in planned.weights[unit.index] if r.compute_dtype
        )
        self._counts.synchronous += 1
        return self._held(unit, dict(zip(names, loaded.tensors)), loaded=loaded)

    def _make_room(self, engine: Engine, nbytes: int, *, keep: set[str]) -> None:
        """Drop kept weights (last kept first) that no running unit uses and ``keep`` does not name,
        until a load of ``nbytes`` of memory of its own fits the limit."""
        if self.limit_bytes is None:
            return
        room = self.limit_bytes - self.reserved_bytes - nbytes
        planned = self._planned
        assert planned is not None
        keep = keep | {ref.name for h in self._all_in_use() for ref in planned.weights[h.unit.index]}
        for name in reversed(engine.plan.resident):
            if engine.held_bytes <= room:
                break
            if name not in keep:
                self._store.drop(name)

    def _all_in_use(self) -> list[_Held]:
        return (self._call.in_use if self._call is not None else []) + self._outside

    def _held(self, unit: Unit, provided: dict[str, torch.Tensor], **engine_parts: Any) -> _Held:
        """The op's tensors: what the engine provided, else the homes on the device, as they are."""
        tensors = []
        for i, slot in enumerate(unit.slots):
            tensor = provided.get(slot.name)
            if tensor is None:
                tensor = unit.home[i]
                assert tensor is not None and tensor.device == self.device, f"{slot.name} has no copy on the device"
            tensors.append(tensor)
        return _Held(unit, tuple(tensors), **engine_parts)


def bind(unit: Unit) -> tuple[WeightRef, ...]:
    """The weights ``unit`` copies to the device, each bound to where its stored bytes are.

    A parameter whose home is on the computation device in the computation dtype is used there and
    not bound; in another dtype it is bound where it lies, for its casts. The others read from their
    home (host memory) or the weights source, rounded to the stored dtype and then to the held one on
    every read (:class:`ConvertedSource`), never as a second copy of the model.
    """
    refs = []
    converted: dict[int, ConvertedSource] = {}
    for i, slot in enumerate(unit.slots):
        home = unit.home[i]
        held, compute = unit.held_dtype(i), unit.compute_dtypes[i]
        if unit.placed(i):
            if home is None or home.dtype == compute:
                continue  # used as it is
            held = home.dtype  # on the device already: kept where it lies, cast there per call
        if home is not None:
            source: Any = HostSource({slot.name: home.detach()})
            key, dtypes = slot.name, (held,) if held != home.dtype else ()
        else:
            assert slot.ref is not None, "a parameter without a home or stored bytes passed the unit checks"
            source, key = slot.ref.source, slot.ref.key
            stored = unit.stored_dtype(i)
            # The file's values rounded to the stored dtype, then narrowed to the held one.
            dtypes = ((stored,) if stored != slot.ref.dtype else ()) + ((held,) if held != stored else ())
        if dtypes:
            source = serve_converted(converted, source, key, dtypes, keep=False)
        refs.append(
            WeightRef(
                slot.name, source, key, slot.shape, held, math.prod(slot.shape) * held.itemsize,
                requires_grad=slot.requires_grad, compute_dtype=compute if compute != held else None,
            )
        )
    return tuple(refs)


def empty_plan(arena_bytes: int, alignment: int, budget_bytes: int) -> Plan:
    """A plan with nothing to fetch, keep or cast: an engine for loads off the plan only."""
    return Plan(
        budget_bytes=budget_bytes, peak_bytes=arena_bytes, resident_bytes=0, streamed_bytes=0, weight_bytes=0,
        activation_peak_bytes=0, workspace_bytes=0, arena_bytes=arena_bytes, alignment=alignment, num_positions=0,
        calls=1, resident=(), transfers=(), weights=(), predicted=Prediction(0.0, 0.0, 0.0, 0.0, 0.0),
    )


def _transient_bytes(ref: WeightRef, device: torch.device) -> int:
    """Device memory a read of ``ref`` takes besides its destination: on CPU, a converted read's
    source bytes and each conversion's result."""
    source = ref.source
    if device.type != "cpu" or not isinstance(source, ConvertedSource) or source.keep:
        return 0
    numel = math.prod(ref.shape)
    chain = source._dtypes[ref.key]
    return source.source.info(ref.key).nbytes + sum(numel * d.itemsize for d in chain)


def _flops_per_unit(record: CallRecord) -> dict[int, float]:
    """Each unit's mean FLOPs per call of it, from a counted record."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for unit, flops in zip(record.order, record.flops):
        total[unit] = total.get(unit, 0.0) + flops
        count[unit] = count.get(unit, 0) + 1
    return {u: total[u] / count[u] for u in total}


def _copy_out(output: Any, engine: Engine) -> Any:
    """Outputs that view the engine's memory (a module returning its weight) get their own."""
    leaves = pytree.tree_leaves(output)
    if not any(isinstance(t, torch.Tensor) and engine.owns(t) for t in leaves):
        return output
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if engine.owns(t) else t, output)


def _memory_sampler(device: torch.device) -> Callable[[], int]:
    """Memory in use on ``device``, as the budget counts it."""
    if device.type == "cuda":
        return lambda: torch.cuda.memory_allocated(device)
    from vramfx.budget import rss_anon_bytes

    return rss_anon_bytes
