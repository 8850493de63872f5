"""The layer-swap runtime: the module front end of the engine compiled graphs run on.

One runtime serves every unit (wrapped module) of one model through one
:class:`~vramfx.runtime.engine.Engine` (a reader thread on CPU, a copy stream and staging ring on
CUDA), driven by a :class:`~vramfx.runtime.follow.Follower`. The front end owns only what it must:
binding the engine's views into the modules, and recording the order they run in.

- **A call** is one forward of the model (its ``forward`` is patched to say where it begins and
  ends), or, when a pipeline calls the model's modules without its forward (``model_fn(dit=...)``),
  a *pass* found from the module calls themselves (:mod:`vramfx.swap.passes`).
- **The first call** records the order units run in and each one's FLOPs; every unit's weights
  are loaded synchronously into a small scratch arena.
- **After it**, the planner (:func:`vramfx.plan.schedule.schedule`, over a Liveness whose
  positions are unit calls and whose weights are the units' tensors) chooses the weights kept on
  the device under the limit, and transfers for the others: a Plan, checked like every plan.
- **Later calls** follow it: a unit called at position ``p`` gets what the plan's steps up to
  ``p`` provide, exactly as a compiled graph's nodes would run them, and the next call's first
  transfers are fetched when a call ends.
- **A unit not where the order predicts** leaves the plan for the rest of the call (it and the
  units after it are loaded synchronously: slower, never a wrong result), and the call's order
  then becomes the recorded one, planned anew (for passes found from module calls, once the calls
  show the new order twice).

The limit covers what the engine holds: kept weights, the arena, the upcast region (weights
held in a narrower dtype than they compute in are cast there per call) and loads off the plan.
A limit below what the units need at once (``0`` included) loads every unit synchronously, one
at a time, into memory of its own. Calls are serialised: one thread at a time runs the model.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vramfx.adapters.fusions import fusions_of, fusions_version
from vramfx.errors import BudgetError, VramfxError
from vramfx.forks import renew_after_fork
from vramfx.measure import memory_in_use
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.plan.schedule import schedule
from vramfx.runtime import make_engine
from vramfx.runtime.engine import ResidentStore, layout
from vramfx.runtime.follow import CallCounts, Follower, Hold
from vramfx.storage.converted import ConvertedSource, serve_converted
from vramfx.storage.host import HostSource
from vramfx.storage.ref import WeightRef
from vramfx.swap.fused import Fusions, fused_ref, merges, structure
from vramfx.swap.passes import Item, PassFinder, items_of, record_of
from vramfx.swap.record import CallRecord, Recorder, flops_per_unit, to_liveness
from vramfx.swap.units import Unit
from vramfx.util import ALIGNMENT, format_bytes

log = logging.getLogger(__name__)

#: Calls a plan is optimised for, as :func:`vramfx.compile`'s default.
PLANNED_CALLS = 10
#: Without a limit, weights are kept for every later call: loading one costs nothing per call.
KEPT_FOR_GOOD = 2**31
#: Top-level module calls a recording may span before it ends anyway (calls that never repeat).
RECORDING_ITEMS = 4096


@dataclass(frozen=True)
class SwapStats:
    """What a layer-swap runtime holds, and what its latest call did.

    Attributes
    ----------
    limit_bytes:
        The limit over the weights it holds on the device (None: no limit).
    resident:
        Units whose weights the plan keeps on the device, in order of first use.
    resident_bytes, arena_bytes, streamed_bytes:
        Bytes of the kept weights, of the planned arena the others stream through, and of what
        the plan fetches on every call.
    calls:
        Calls served so far: forward calls of the model, and passes found from module calls.
    fetched_bytes, cast_bytes:
        Bytes the latest call copied to the device (in the dtypes they are held in), and the
        bytes its casts wrote in compute dtypes.
    prefetched, synchronous:
        Units of the latest call whose weights were fetched ahead, and units it waited on from
        the start (the first call's, a mispredicted unit's, every one without prefetch or when
        nothing can be held ahead).
    wait_seconds:
        Seconds the latest call spent waiting for weights.
    held_bytes, held_peak_bytes:
        Bytes the runtime holds on the device now, and the most it has held at once, by its own
        accounting.
    activation_peak_bytes:
        Activations measured on the first call, when the limit covers them (compile's
        fallback); else 0.
    order:
        The recorded order of units (their names), empty before the first call.
    upcast_bytes:
        Bytes of the planned upcast region.
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
    """One plan, its engine and follower, and the weights each unit reads through them."""

    follower: Follower
    weights: dict[int, tuple[WeightRef, ...]]  # unit index -> the weights it copies or casts
    plan: Plan | None  # None: recording, or nothing fits and every unit loads synchronously


@dataclass
class _Call:
    """The call in progress: its recording, and how far along the recorded order it is.

    ``opener`` is None for a call of the model's forward; for a pass found from module calls (no
    forward marks it), the unit that began it.
    """

    recorder: Recorder
    position: int = 0
    holds: list[tuple[Unit, Hold, int]] = field(default_factory=list)  # (unit, hold, position recorded)
    opener: int | None = None
    items: list[Item] = field(default_factory=list)  # a pass's top-level calls so far


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
        self._unit_flops: dict[int, float] = {}  # per unit, FLOPs of one call of it, as first recorded
        self._planned: _Planned | None = None
        self._stale = True  # units or their homes changed: bind and plan again before the next call
        self._fusions: tuple[int, Fusions] = (-1, {})  # (records' version, merges) as last seen
        self._call: _Call | None = None
        self._opened: list[bool] = []  # per begin_call in progress: whether it opened the call
        self._passes = PassFinder()
        self._calls = 0
        self._counts = CallCounts()  # the latest call's
        self._held_peak = 0
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        """A forked child starts with no call in progress and a lock nobody holds (the parent's
        thread that held it does not exist here); the engine renews its own workers."""
        self._lock = threading.RLock()
        self._call = None
        self._opened = []
        self._passes = PassFinder()

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
        return self._planned.follower.engine.held_bytes if self._planned is not None else 0

    def stats(self) -> SwapStats:
        """What is held, and what the latest call did."""
        record, planned, counts = self._record, self._planned, self._counts
        plan = planned.plan if planned is not None else None
        kept = set(plan.resident) if plan is not None else set()
        resident = tuple(
            self.units[u].name for u in dict.fromkeys(record.order if record is not None else ())
            if planned is not None and planned.weights[u] and all(r.name in kept for r in planned.weights[u])
        )
        return SwapStats(
            limit_bytes=self.limit_bytes,
            resident=resident,
            resident_bytes=plan.resident_bytes if plan is not None else 0,
            arena_bytes=plan.arena_bytes if plan is not None else 0,
            calls=self._calls,
            fetched_bytes=counts.fetched_bytes,
            prefetched=counts.prefetched,
            synchronous=counts.synchronous,
            wait_seconds=counts.wait_seconds,
            held_bytes=self.held_bytes,
            held_peak_bytes=self._held_peak,
            activation_peak_bytes=record.activation_peak_bytes if record is not None else 0,
            order=tuple(self.units[u].name for u in record.order) if record is not None else (),
            upcast_bytes=plan.upcast_bytes if plan is not None else 0,
            cast_bytes=counts.cast_bytes,
            streamed_bytes=plan.streamed_bytes if plan is not None else 0,
        )

    def release(self) -> None:
        """Free everything held on the device: kept weights, the arena, copies in flight.

        A pass no forward of the model marks ends here (a pipeline offloads a model between uses).
        """
        with self._lock:
            call = self._call
            if call is not None and call.holds:
                raise VramfxError("cannot release the layer-swap runtime while a module is running")
            if call is not None and call.opener is not None:
                self._finish(call, prefetch=False)
            if self._planned is not None:
                self._planned.follower.engine.deactivate()
            self._store.clear()

    def homes_changed(self) -> None:
        """Units' homes moved (offload/onload): free what is held, bind and plan again."""
        with self._lock:
            self.release()
            self._stale = True

    # -- call boundaries -------------------------------------------------------------------------
    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def begin_call(self) -> None:
        """The model's forward starts. Calls nest: one inside a call (the forward calling itself, or
        a wrapped module calling the model) is part of it."""
        self._lock.acquire()
        try:
            call = self._call
            if call is not None and (call.opener is None or call.holds):
                self._opened.append(False)
                return
            if call is not None:
                self._finish(call)  # a pass found from module calls ends where the forward starts
            self._open(opener=None)
            self._opened.append(True)
        except BaseException:
            self._lock.release()
            raise

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def end_call(self, *, failed: bool = False) -> None:
        """The model's forward returned (or raised, when ``failed``)."""
        try:
            if self._opened.pop() and self._call is not None:
                self._finish(self._call, failed=failed)
        finally:
            self._lock.release()

    def _open(self, *, opener: int | None) -> _Call:
        """Start a call: the model's forward (``opener`` None), or a pass that module ``opener`` begins."""
        planned = self._ready()
        planned.follower.begin_call(on_plan=planned.plan is not None)
        self._calls += 1
        recording = self._record is None
        measured = recording and self.activations_in_limit and opener is None
        memory = (lambda: memory_in_use(self.device)) if measured else None
        self._call = _Call(Recorder(count_flops=recording, memory=memory, held_bytes=self.held_bytes), opener=opener)
        return self._call

    def _finish(self, call: _Call, *, failed: bool = False, order: list[Item] | None = None, prefetch: bool = True) -> None:
        """End ``call``: drop what it left fetched; unless it failed, adopt the order it shows (a root
        call's own; a pass's, as the PassFinder says; or ``order``) and fetch the next call's first
        weights."""
        self._call = None
        call.recorder.stop()
        planned = self._planned
        assert planned is not None
        follower, followed = planned.follower, self._record
        completed = follower.on_plan and followed is not None and call.position == len(followed.order)
        follower.end_call(failed=failed)
        self._counts = follower.counts
        if failed:
            return
        record = call.recorder.record
        if followed is None and record.order:
            self._unit_flops = flops_per_unit(record)
        if call.opener is None and order is None:
            if record.order and (followed is None or (record.order, record.ends) != (followed.order, followed.ends)):
                if followed is not None:
                    log.debug("the module order changed (%d -> %d calls); planning again", len(followed.order),
                              len(record.order))
                    record.flops = [self._unit_flops.get(u, 0.0) for u in record.order]
                self._adopt(record)
                self._passes.adopted(items_of(record))
        else:
            if order is not None:
                self._passes.adopted(order)
            else:
                order = self._passes.pass_ended(call.items, completed=completed)
            if order is not None:
                log.debug("passes found from module calls: following an order of %d positions", sum(map(len, order)))
                self._adopt(record_of(order, self._unit_flops))
        if prefetch:
            self._planned.follower.fetch_for_next_call()  # type: ignore[union-attr]

    def _starts_pass(self, call: _Call, unit: Unit) -> bool:
        """Whether a top-level call of ``unit`` begins a new pass: its opener called again where the
        followed order does not expect it."""
        follower, followed, p = self._planned.follower, self._record, call.position  # type: ignore[union-attr]
        if follower.on_plan and followed is not None and p < len(followed.order) and followed.order[p] == unit.index:
            return False
        return unit.index == call.opener

    def _top_level_returned(self, call: _Call, failed: bool) -> None:
        """A top-level module of a pass returned: the pass ends when it failed, when the followed order's
        last position is done, or (recording) when the calls so far end by repeating a block."""
        followed = self._record
        if failed:
            self._finish(call, failed=True)
        elif followed is not None:
            if self._planned.follower.on_plan and call.position == len(followed.order):  # type: ignore[union-attr]
                self._finish(call)
        else:
            block = self._passes.recording_period(call.items)
            if block is not None or len(call.items) > RECORDING_ITEMS:
                self._finish(call, order=block)

    # -- serving units ------------------------------------------------------------------------
    def run(self, unit: Unit, fn: Callable[[tuple[torch.Tensor, ...]], Any]) -> Any:
        """``fn(tensors)`` with ``unit``'s parameters on the device; released however it ends."""
        tensors = self.acquire(unit)
        try:
            output = fn(tensors)
        except BaseException:
            self.release_unit(unit, failed=True)
            raise
        return self.release_unit(unit, output)

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def acquire(self, unit: Unit) -> tuple[torch.Tensor, ...]:
        """``unit``'s parameters on the device in the computation dtype, for one forward.

        Called outside any call of the model, it joins the pass in progress or begins one (see
        :mod:`vramfx.swap.passes`). The runtime's lock is held from here to :meth:`release_unit`:
        one thread at a time.
        """
        self._lock.acquire()
        try:
            call = self._call
            if call is None or (call.opener is not None and not call.holds and self._starts_pass(call, unit)):
                if call is not None:
                    self._finish(call)
                call = self._open(opener=unit.index)
            planned = self._planned
            assert planned is not None
            follower, record = planned.follower, self._record
            position = None
            if follower.on_plan and record is not None:
                p = call.position
                position = p if p < len(record.order) and record.order[p] == unit.index else None
            hold = follower.take([r.name for r in planned.weights[unit.index]], position)
            if position is not None and follower.on_plan:
                call.position += 1
            tensors = tuple(hold.tensors.get(s.name, unit.home[i]) for i, s in enumerate(unit.slots))
            call.holds.append((unit, hold, call.recorder.enter(unit.index, self.held_bytes)))
            self._held_peak = max(self._held_peak, self.held_bytes)
            return tensors  # type: ignore[return-value]
        except BaseException:
            self._lock.release()
            raise

    @torch.compiler.disable  # copies and threads run as written under torch.compile
    def release_unit(self, unit: Unit, output: Any = None, *, failed: bool = False) -> Any:
        """``unit``'s forward returned ``output`` (or raised, when ``failed``); its streamed weights may go.

        Returns ``output``, with tensors that view the engine's memory copied out of it (their
        bytes are about to be reused).
        """
        try:
            call = self._call
            holds = call.holds if call is not None else []
            k = next((k for k in range(len(holds) - 1, -1, -1) if holds[k][0] is unit), None)
            if call is None or k is None:
                raise VramfxError(f"unit {unit.name!r} was released without being acquired")
            _, hold, position = holds.pop(k)
            call.recorder.exit(position, self.held_bytes)
            output = self._planned.follower.give_back(hold, output)  # type: ignore[union-attr]
            if call.opener is not None and not call.holds:
                order, ends = call.recorder.record.order, call.recorder.record.ends
                call.items.append(tuple((order[q], max(ends[q], q + 1) - q) for q in range(position, len(order))))
                self._top_level_returned(call, failed)
            return output
        finally:
            self._lock.release()

    # -- planning -----------------------------------------------------------------------------
    def _ready(self) -> _Planned:
        """The plan for the next call, bound and planned again if anything changed, active."""
        self._follow_fusions()
        if self._stale or self._planned is None:
            self._stale = False
            self._replan()
        planned = self._planned
        assert planned is not None
        planned.follower.engine.activate()
        return planned

    def _follow_fusions(self) -> None:
        """LoRA merged into or taken off the units' weights since last seen: a kept copy of a weight
        whose merges changed is dropped (it holds them fused, or is held otherwise), and when which
        weights carry merges of which ranks changed, every unit is bound and planned again. Other
        merges of the same ranks need no plan: decoders read them at every cast."""
        version, seen = self._fusions
        if version == fusions_version():
            return
        now = merges(self._anchors())
        for name in set(now) | set(seen):
            if tuple(map(id, now.get(name, ()))) != tuple(map(id, seen.get(name, ()))):
                self._store.drop(name)
        if structure(now) != structure(seen):
            self._stale = True
        self._fusions = (fusions_version(), now)

    def _anchors(self) -> list[tuple[str, torch.Tensor]]:
        return [(slot.name, unit.anchors[i]) for unit in self.units for i, slot in enumerate(unit.slots)]

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
        """Bind every unit's weights and plan them for the recorded order (or for the recording)."""
        if self._planned is not None:
            self._planned.follower.engine.deactivate()
        weights = {u.index: bind(u) for u in self.units}
        refs = {ref.name: ref for unit_refs in weights.values() for ref in unit_refs}
        plan = self._schedule(weights) if self._record is not None else None
        engine = make_engine(
            plan if plan is not None else self._scratch_plan(weights), refs, self.device, self._store,
            bypass_page_cache=self.bypass_page_cache,
        )
        room = self.limit_bytes - self.reserved_bytes if self.limit_bytes is not None else None
        self._planned = _Planned(Follower(engine, prefetch=self.prefetch, room_bytes=room), weights, plan)

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
        """No steps, and an arena for the loads of the recording call: two of the largest units (so
        its loads do not churn the allocator) within the limit. None when nothing is planned ahead
        (each unit then in memory of its own, one at a time)."""
        largest = max((layout(refs, self.alignment)[2] for refs in weights.values()), default=0)
        room = 2 * largest
        if self.limit_bytes is not None:
            room = min(room, self.limit_bytes - self.reserved_bytes)
        if self._record is not None or room < largest:
            room = 0
        return Plan.empty(max(0, room), alignment=self.alignment, budget_bytes=self.limit_bytes or 0)


def bind(unit: Unit) -> tuple[WeightRef, ...]:
    """The weights ``unit`` copies or casts on the device, each bound to where its stored bytes are.

    A parameter whose home is on the computation device in the computation dtype is used there and
    not bound; in another dtype it is bound where it lies, for its casts. The others read from their
    home (host memory) or the weights source, rounded to the stored dtype and then to the held one on
    every read (:class:`ConvertedSource`), never as a second copy of the model. A weight with LoRA
    merged into it is bound wherever it lies, decoded with the merges added (:mod:`vramfx.swap.fused`).
    """
    refs = []
    converted: dict[int, ConvertedSource] = {}
    for i, slot in enumerate(unit.slots):
        home = unit.home[i]
        held, compute = unit.held_dtype(i), unit.compute_dtypes[i]
        if unit.decoded(i):  # a stored run, decoded on the device per call
            ref = slot.ref
            assert ref is not None
            source, key = (HostSource({slot.name: home.detach()}), slot.name) if home is not None else (ref.source, ref.key)
            ref = replace(ref, name=slot.name, source=source, key=key, requires_grad=slot.requires_grad,
                          compute_dtype=compute)
            refs.append(fused_ref(ref, unit.anchors[i], compute))
            continue
        if unit.placed(i):
            if home is None or (home.dtype == compute and not fusions_of(unit.anchors[i])):
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
        ref = WeightRef(
            slot.name, source, key, slot.shape, held, math.prod(slot.shape) * held.itemsize,
            requires_grad=slot.requires_grad, compute_dtype=compute if compute != held else None,
        )
        refs.append(fused_ref(ref, unit.anchors[i], compute))
    return tuple(refs)


def _transient_bytes(ref: WeightRef, device: torch.device) -> int:
    """Device memory a read of ``ref`` takes besides its destination: on CPU, a converted read's
    source bytes and each conversion's result."""
    source = ref.source
    if device.type != "cpu" or not isinstance(source, ConvertedSource) or source.keep:
        return 0
    numel = math.prod(ref.shape)
    return source.source.info(ref.key).nbytes + sum(numel * d.itemsize for d in source.dtypes(ref.key))
