"""One compiled entry point of one pipeline component: a *unit* of the pipeline's budget.

A component is called through its ``forward`` (text encoders, the transformer) or through
another method (a VAE's ``decode``). Each such entry is compiled on its own, under the budget
left to it while it runs: the pipeline's budget less what the other units keep meanwhile
(``reserve``, read each time the unit is planned, so a changed reserve is honoured by
:meth:`Unit.replan`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch

from vramfx.compiled import CompiledModule
from vramfx.compiler import (
    DEFAULT_MARGIN_BYTES,
    allocator_slack_bytes,
    CompileOptions,
    build_graph,
    link_bytes_per_s,
    module_path,
    plan_graph,
    timed_if_asked,
)
from vramfx.plan.costs import CostModel
from vramfx.plan.liveness import build_liveness
from vramfx.plan.plan import Plan
from vramfx.plan.schedule import schedule
from vramfx.util import ALIGNMENT
from vramfx.storage.checkpoint_keys import checkpoint_key_map
from vramfx.storage.diskmap import DiskMap
from vramfx.weights import resolve_weights, stored_formats, stored_state
from vramfx.adapters.state import adapter_state


class MethodCall(torch.nn.Module):
    """``model.<method>(...)`` as a module's ``forward``, so it can be captured and compiled.

    The model is a submodule named ``model``: its weights are named ``model.<name>``, which the
    unit's DiskMap renames its keys to.
    """

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


@dataclasses.dataclass
class Unit:
    """One entry point (``component.method``) compiled under its share of the pipeline budget.

    ``calls`` is how many times one generation calls it; ``kept`` whether its resident weights
    stay between generations (then other units plan around ``kept_bytes``).
    """

    component: str
    method: str
    compiled: CompiledModule
    options: CompileOptions
    plan_at: Callable[[int, int], Any]
    calls: int = 1
    kept: bool = False
    #: Device bytes it holds between its calls when kept: fixed when it is chosen (all its weights
    #: resident), so the others' plans never depend on the order plans are remade in.
    kept_bytes: int = 0

    @property
    def name(self) -> str:
        return f"{self.component}.{self.method}" if self.method != "forward" else self.component

    @property
    def graph_bytes(self) -> int:
        """Host memory its captured graphs hold outside their plans (CPU)."""
        return sum(g.graph_bytes for g in self.compiled.compiled_graphs)


    def replan(self) -> None:
        """Plan every captured signature again under the current reserve and options."""
        self.compiled.replan()


def compile_unit(
    component: str,
    method: str,
    model: torch.nn.Module,
    folder: Any,
    *,
    budget_bytes: int,
    device: torch.device,
    reserve: Callable[[], int],
    calls: int = 1,
    cost_model: CostModel | None = None,
) -> Unit:
    """Compile ``model.<method>`` with weights from the safetensors in ``folder``.

    ``reserve()`` is what the unit's plans set aside for the rest of the pipeline, on top of
    the usual margin; it is read at every planning, so a unit is planned for what the others
    hold when it runs.
    """
    target: torch.nn.Module = model
    key_map = None
    if method != "forward":
        target = MethodCall(model, method)
        key_map = functools.partial(operator.add, "model.")  # stored "decoder.x" -> "model.decoder.x"
    source = DiskMap(folder, key_map=key_map)
    options = CompileOptions(
        budget_bytes=budget_bytes,
        device=device,
        calls=calls,
        cost_model=cost_model or CostModel.for_device(device, link_bytes_per_s=link_bytes_per_s(device, source)),
        margin_bytes=DEFAULT_MARGIN_BYTES.get(device.type, 0),
        bypass_page_cache=False,
    )
    renamed = checkpoint_key_map(target, source)
    unit: Unit

    def current(reserved: int | None = None, calls: int | None = None) -> CompileOptions:
        return dataclasses.replace(
            unit.options,
            margin_bytes=unit.options.margin_bytes + (reserve() if reserved is None else reserved),
            calls=unit.options.calls if calls is None else calls,
        )

    def build(args: tuple, kwargs: dict[str, Any], store: Any, held_bytes: int) -> Any:
        return build_graph(target, args, kwargs, source, renamed, current(), store, held_bytes)

    def replan(captured: Any, store: Any, held_bytes: int, graph_bytes: int) -> Any:
        return plan_graph(target, captured, source, renamed, current(), store, held_bytes, graph_bytes)

    livenesses: dict[int, Any] = {}

    def plan_at(reserved: int, calls: int) -> Plan:
        """The plan the latest signature would get if the unit left ``reserved`` bytes to the
        others and were planned for ``calls``: liveness kept, scheduled only (no engine)."""
        latest = next(g for g in reversed(compiled.compiled_graphs) if g.plan is compiled.plan)
        liveness = livenesses.get(id(latest.captured))
        if liveness is None:
            refs = resolve_weights(latest.captured.weights, source, renamed=renamed)
            liveness = build_liveness(latest.captured, device=device, storage_dtypes={n: r.dtype for n, r in refs.items()},
                                      stored_formats=stored_formats(refs, device))
            liveness = timed_if_asked(liveness, latest.captured, device, unit.options.cost_model,
                                      unit.options.budget_bytes, refs,
                                      in_place=unit.options.in_place and not unit.options.bypass_page_cache)
            livenesses.clear()
            livenesses[id(latest.captured)] = liveness
        held = unit.graph_bytes  # this unit's graphs, the latest's among them
        margin = unit.options.margin_bytes + reserved + held + allocator_slack_bytes(liveness, device)
        return schedule(liveness, unit.options.budget_bytes, cost_model=unit.options.cost_model, calls=calls,
                        alignment=ALIGNMENT.get(device.type, 64), margin_bytes=margin)

    compiled = CompiledModule(
        target,
        device,
        build,
        replan=replan,
        module_path=lambda: module_path(target, source, current()),
        stored_state=lambda: stored_state(target, source, renamed=renamed),
        adapter_state=lambda: adapter_state(target),
    )
    unit = Unit(component, method, compiled, options, plan_at, calls=calls)
    return unit
