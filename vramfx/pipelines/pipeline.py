"""``vramfx.compile_pipeline``: every component of a diffusers pipeline under one budget.

Planning is a dry run of the pipeline's call: each component's entry point, instead of running,
records its call (how many per generation, with which inputs) and returns zeros shaped as its
output (the model run on meta tensors says what). Then every unit is captured and planned for
its calls, the budget is shared (:mod:`vramfx.pipelines.shares`) and every plan is made again
for its share — all before a single weight is read. A budget below the pipeline's minimum is
refused then, with the minimum.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.budget import parse_budget
from vramfx.capture import capture
from vramfx.compiled import input_signature
from vramfx.compiler import _resolve_device
from vramfx.errors import BudgetError
from vramfx.pipelines.loading import load_components, read_index
from vramfx.pipelines.members import PipelineMember, Turns
from vramfx.pipelines.shares import UnitCost, choose_kept, pipeline_minimum, reserve_bytes
from vramfx.pipelines.units import Unit, compile_unit
from vramfx.util import format_bytes

log = logging.getLogger(__name__)

#: The budget units are first captured and planned under, before their shares are known.
UNLIMITED_BYTES = 2**62
#: Generations a unit kept across generations is planned for (its resident weights load once).
KEPT_GENERATIONS = 100
#: The pipeline's own tensors between units (embeddings, latents, the decoded image and the
#: scheduler's and post-processing's copies of them), per byte a unit takes in and gives out.
PIPELINE_TENSOR_FACTOR = 2
#: Call arguments that do not change what the units are called with.
_UNPLANNED_ARGUMENTS = ("generator", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback")


@dataclasses.dataclass
class _Recorded:
    """One entry point's calls in a dry run."""

    calls: int = 0
    example: tuple | None = None
    io_bytes: int = 0


class PipelineBudget:
    """The units of one pipeline, their shares of the budget, and whose turn it is."""

    def __init__(self, root: Path, budget_bytes: int, device: torch.device) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.device = device
        self.units: dict[tuple[str, str], Unit] = {}
        self.kept: frozenset[str] = frozenset()
        self.tensor_bytes = 0
        self.turns = Turns()
        self.planned: set[tuple] = set()
        self._recording: dict[tuple[str, str], _Recorded] | None = None
        self._dry_outputs: dict[tuple, Any] = {}

    # -- the units' view ---------------------------------------------------------------------
    def reserve(self, name: str) -> int:
        """What unit ``name`` leaves to the rest of the pipeline while it runs."""
        return reserve_bytes(name, self._costs(), self.kept, self.tensor_bytes)

    def _costs(self) -> list[UnitCost]:
        return [UnitCost(u.name, u.calls, u.graph_bytes, u.kept_bytes if u.kept else None) for u in self.units.values()]

    def unit(self, member: PipelineMember, method: str) -> Unit:
        key = (member.name, method)
        unit = self.units.get(key)
        if unit is None:
            name = member.name if method == "forward" else f"{member.name}.{method}"
            unit = compile_unit(
                member.name, method, member.model, self.root / member.name, budget_bytes=self.budget_bytes,
                device=self.device, reserve=lambda: self.reserve(name),
            )
            self.units[key] = unit
        return unit

    def call(self, member: PipelineMember, method: str, args: tuple, kwargs: dict) -> Any:
        """An entry point called by the pipeline: recorded in a dry run, else run in its turn."""
        if self._recording is not None:
            return self._record(member, method, args, kwargs)
        unit = self.unit(member, method)
        self.turns.enter(unit)
        return unit.compiled(*args, **kwargs)

    # -- planning ---------------------------------------------------------------------------
    def _record(self, member: PipelineMember, method: str, args: tuple, kwargs: dict) -> Any:
        record = self._recording.setdefault((member.name, method), _Recorded())  # type: ignore[union-attr]
        record.calls += 1
        if record.example is None:
            record.example = (args, dict(kwargs))
        key = (member.name, method, input_signature(args, kwargs))
        if key not in self._dry_outputs:
            self._dry_outputs[key] = _zeros_like_output(self.unit(member, method).compiled.model, args, kwargs, self.device)
        out = self._dry_outputs[key]
        record.io_bytes = max(record.io_bytes, _tensor_bytes((args, kwargs)) + _tensor_bytes(out))
        return out

    def plan(self, pipeline: Any, call: Any, args: tuple, kwargs: dict) -> None:
        """Dry-run ``call(*args, **kwargs)`` and plan every unit it calls under the budget.

        Raises
        ------
        BudgetError
            The budget is below the pipeline's minimum (which it carries), or one unit cannot
            fit its share; nothing has run.
        """
        states = _rng_states(args, kwargs)
        progress = pipeline.__dict__.get("_progress_bar_config")
        pipeline._progress_bar_config = {**(progress or {}), "disable": True}  # a dry run shows no steps
        self._recording = {}
        try:
            dry = {k: v for k, v in kwargs.items() if k not in ("callback_on_step_end", "callback")}
            call(pipeline, *args, **dry)
            recorded = self._recording
        finally:
            self._recording = None
            self._dry_outputs.clear()
            _restore_rng(states)
            if progress is None:
                del pipeline._progress_bar_config
            else:
                pipeline._progress_bar_config = progress
        members = {m.name: m for m in pipeline.components.values() if isinstance(m, PipelineMember)}
        self.tensor_bytes = max(
            self.tensor_bytes, PIPELINE_TENSOR_FACTOR * sum(r.io_bytes for r in recorded.values())
        )
        for (name, method), record in recorded.items():
            unit = self.unit(members[name], method)
            unit.calls = record.calls
            unit.options = dataclasses.replace(unit.options, calls=record.calls)
        for (name, method), record in recorded.items():
            self._capture(self.unit(members[name], method), record.example)
        self._set_kept(frozenset())
        failures = self._replan_all()
        for (name, method), record in recorded.items():
            unit = self.unit(members[name], method)
            if unit.name in failures and method != "forward" and _offers_tiling(members[name].model):
                failures = self._tiled(members[name], method, record.example, failures)
        if not failures:
            self._choose_kept()
            failures = self._replan_all()
            if failures:  # the predictions said it fits; never leave a kept set that does not
                self._set_kept(frozenset())
                failures = self._replan_all()
        if failures:
            self._raise(failures)

    def _capture(self, unit: Unit, example: tuple) -> None:
        """Capture ``unit`` for its example call, planned at first as if alone with no limit: every
        unit's graph must exist before any share can be computed. Plans are remade after."""
        budget_bytes = unit.options.budget_bytes
        unit.options = dataclasses.replace(unit.options, budget_bytes=UNLIMITED_BYTES)
        try:
            unit.compiled.prepare(*example)
        finally:
            unit.options = dataclasses.replace(unit.options, budget_bytes=budget_bytes)

    def _tiled(self, member: PipelineMember, method: str, example: tuple,
               failures: dict[str, BudgetError]) -> dict[str, BudgetError]:
        """A VAE entry point that does not fit its share, planned again with the tiling and
        slicing the model offers. If that does not fit either, the model is left untiled."""
        old = self.units.pop((member.name, method))
        first = failures[old.name]
        _set_tiling(member.model, True)
        unit = self.unit(member, method)
        unit.calls, unit.options = old.calls, old.options
        self._capture(unit, example)
        retried = self._replan_all()
        if retried:
            # Left untiled either way; the minimum stated is the smaller of the two, every unit's
            # counted with the other's graphs (a tiled decode's graph is larger).
            _set_tiling(member.model, False)
            self.units[(member.name, method)] = old
            self._replan_all()
            return min(failures, retried, key=lambda f: pipeline_minimum({n: e.minimum_bytes for n, e in f.items()}))
        warnings.warn(
            f"vramfx.compile_pipeline: {unit.name} does not fit its share of the budget whole "
            f"({first.args[0].split(';')[0]}); it runs with {type(member.model).__name__}'s tiling and slicing "
            "enabled, as enable_tiling() / enable_slicing() would (outputs equal eager's with them enabled)",
            stacklevel=5,
        )
        return retried

    def _choose_kept(self) -> None:
        """Which units keep their resident weights between generations, by predicted cost."""
        costs = []
        for unit in self.units.values():
            kept_bytes, reload = None, 0.0
            try:
                plan = unit.plan_at(self.reserve(unit.name), unit.calls * KEPT_GENERATIONS)
            except BudgetError:
                plan = None
            if plan is not None and plan.streamed_bytes == 0:
                kept_bytes = plan.resident_bytes
                reload = plan.predicted.first_call_seconds - plan.predicted.seconds_per_call
            costs.append(UnitCost(unit.name, unit.calls, unit.graph_bytes, kept_bytes, reload))
            unit.kept_bytes = kept_bytes or 0
        by_name = {u.name: u for u in self.units.values()}

        @functools.lru_cache(maxsize=None)
        def seconds(name: str, reserved: int) -> float | None:
            unit = by_name[name]
            try:
                return unit.plan_at(reserved, unit.options.calls).predicted.seconds_per_call
            except BudgetError:
                return None

        self._set_kept(choose_kept(costs, seconds, self.tensor_bytes))

    def _set_kept(self, kept: frozenset[str]) -> None:
        """Units in ``kept`` keep their weights between generations and are planned for many calls."""
        for unit in self.units.values():
            unit.kept = unit.name in kept
            if not unit.kept:
                unit.kept_bytes = 0
            calls = unit.calls * (KEPT_GENERATIONS if unit.kept else 1)
            unit.options = dataclasses.replace(unit.options, calls=calls)
        self.kept = frozenset(kept)

    def _replan_all(self) -> dict[str, BudgetError]:
        failures = {}
        for unit in self.units.values():
            try:
                unit.replan()
            except BudgetError as exc:
                failures[unit.name] = exc
        for unit in self.units.values():
            plan = unit.compiled.plan
            if unit.kept and plan is not None and plan.resident_bytes > unit.kept_bytes:
                # The others were planned around kept_bytes; holding more would break their budget.
                failures[unit.name] = BudgetError(
                    f"{unit.name} would keep {format_bytes(plan.resident_bytes)}, more than the "
                    f"{format_bytes(unit.kept_bytes)} the others were planned around",
                    minimum_bytes=self.budget_bytes + plan.resident_bytes - unit.kept_bytes,
                )
        return failures

    def _raise(self, failures: dict[str, BudgetError]) -> None:
        minimum = pipeline_minimum({name: exc.minimum_bytes for name, exc in failures.items()})
        lines = [f"  {name}: {exc.args[0]}" for name, exc in failures.items()]
        raise BudgetError(
            f"budget {format_bytes(self.budget_bytes)} ({self.budget_bytes} bytes) is below the minimum of "
            f"{format_bytes(minimum, round_up=True)} for this pipeline and call: its components run one at a "
            f"time, and each must fit the budget less what the others hold meanwhile "
            f"({format_bytes(self.tensor_bytes)} of pipeline tensors, and the others' graphs); pass "
            f"budget >= {format_bytes(minimum, round_up=True)} (budget_bytes >= {minimum}). Nothing has run.\n"
            + "\n".join(lines),
            minimum_bytes=minimum,
        )

    def report(self) -> list[dict[str, Any]]:
        """One row per unit: its calls per generation, share, planned peak, kept or released."""
        rows = []
        for unit in self.units.values():
            plan = unit.compiled.plan
            rows.append(dict(
                unit=unit.name, calls=unit.calls, kept=unit.kept, reserve_bytes=self.reserve(unit.name),
                peak_bytes=plan.peak_bytes if plan else None,
                resident_bytes=plan.resident_bytes if plan else None,
                streamed_bytes=plan.streamed_bytes if plan else None,
                seconds_per_call=plan.predicted.seconds_per_call if plan else None,
            ))
        return rows


def compile_pipeline(
    pipeline: Any,
    root: str | os.PathLike,
    budget: int | str,
    *,
    device: torch.device | str | None = None,
    example: dict[str, Any] | None = None,
) -> Any:
    """A diffusers pipeline whose every component with weights runs under one ``budget``.

    Parameters
    ----------
    pipeline:
        A diffusers pipeline class (``FluxPipeline``), or a pipeline whose components with
        weights were built empty (their weights are read from ``root``).
    root:
        The folder the pipeline was saved to: ``model_index.json`` and one folder of
        safetensors per component.
    budget:
        Bytes for all components together, as for :func:`vramfx.compile`.
    device:
        The compute device; CUDA when available, else CPU.
    example:
        The keyword arguments of a call (``prompt``, ``height``, ``num_inference_steps``, ...).
        When given, every component is captured and planned now; otherwise on the pipeline's
        first call with new shapes, before any component runs.

    Returns
    -------
    The pipeline, built with its constructor; components with weights are
    :class:`~vramfx.pipelines.PipelineMember`\\ s, and ``pipe.vramfx`` is its budget
    (``pipe.vramfx.report()``: per-component peaks).

    Raises
    ------
    BudgetError
        The budget is below the pipeline's minimum for the call, which it carries
        (``minimum_bytes``); raised before any weight is read.
    ValueError
        ``root`` is not a saved pipeline, or an argument is wrong.
    """
    device = _resolve_device(device)
    budget_bytes = parse_budget(budget, device)
    root = Path(root)
    index = read_index(root)
    if isinstance(pipeline, type):
        cls = pipeline
        components = load_components(root, index)
        settings = dict(index.settings)
    else:
        cls = type(pipeline)
        components = dict(pipeline.components)
        settings = {}
    if not callable(getattr(cls, "__call__", None)) or not hasattr(cls, "components"):
        raise TypeError(f"pipeline must be a diffusers pipeline class or instance, got {cls!r}")
    budget_state = PipelineBudget(root, budget_bytes, device)
    members = {
        name: PipelineMember(name, value, device, budget_state.call) if isinstance(value, torch.nn.Module) else value
        for name, value in components.items()
    }
    accepted = inspect.signature(cls.__init__).parameters
    built = _planned_class(cls)(**members, **{k: v for k, v in settings.items() if k in accepted})
    object.__setattr__(built, "vramfx", budget_state)
    if example is not None:
        _ensure_planned(built, (), dict(example))
    return built


_PLANNED_CLASSES: dict[type, type] = {}


def _planned_class(cls: type) -> type:
    """``cls`` whose call is planned (a dry run) the first time it meets new call arguments."""
    found = _PLANNED_CLASSES.get(cls)
    if found is not None:
        return found

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        _ensure_planned(self, args, kwargs)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            self.vramfx.turns.release_all()

    planned = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__doc__": cls.__doc__})
    _PLANNED_CLASSES[cls] = planned
    return planned


def _ensure_planned(pipe: Any, args: tuple, kwargs: dict) -> None:
    budget: PipelineBudget = pipe.vramfx
    key = _call_key(args, kwargs)
    if key in budget.planned:
        return
    base = type(pipe).__mro__[1]
    budget.plan(pipe, base.__call__, args, kwargs)
    budget.planned.add(key)


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """What decides the units' calls: shapes and settings, not prompt text or random state."""
    def shape_of(value: Any) -> Any:
        if isinstance(value, str):
            return "str"
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return ("strs", len(value))
        return value

    kept = {k: shape_of(v) for k, v in kwargs.items() if k not in _UNPLANNED_ARGUMENTS}
    return input_signature(tuple(shape_of(a) for a in args), kept)


def _zeros_like_output(target: torch.nn.Module, args: tuple, kwargs: dict, device: torch.device) -> Any:
    """What ``target(*args, **kwargs)`` returns, as zeros of the same shapes and dtypes.

    The model run on meta tensors says what; where its code reads a value (``mask.all()``), its
    capture does instead (the graph's outputs carry their shapes).
    """
    meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device="meta"),
                                                  (args, kwargs))
    try:
        with torch.no_grad():
            out = target(*meta_args, **meta_kwargs)
    except RuntimeError:
        captured = capture(target, args, kwargs, device=device)
        output = next(n for n in captured.graph_module.graph.nodes if n.op == "output")
        leaves = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in pytree.tree_leaves(output.args[0])]
        out = pytree.tree_unflatten(leaves, captured.out_spec)
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device), out)


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _rng_states(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """Every random state a dry run may advance: the call's generators and torch's own."""
    generators = [g for g in pytree.tree_leaves((args, kwargs)) if isinstance(g, torch.Generator)]
    states: list[tuple[Any, Any]] = [(g, g.get_state()) for g in generators]
    states.append((None, torch.random.get_rng_state()))
    return states


def _restore_rng(states: list[tuple[Any, Any]]) -> None:
    for generator, state in states:
        if generator is None:
            torch.random.set_rng_state(state)
        else:
            generator.set_state(state)


def _offers_tiling(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "enable_tiling", None)) and not getattr(model, "use_tiling", False)


def _set_tiling(model: torch.nn.Module, enabled: bool) -> None:
    """``enable_tiling``/``enable_slicing`` (or their ``disable_``) where the model offers them."""
    for what in ("tiling", "slicing"):
        switch = getattr(model, f"{'enable' if enabled else 'disable'}_{what}", None)
        if callable(switch):
            switch()
