"""rewrite: the plan's steps become graph nodes at their positions; weight placeholders go away."""

from __future__ import annotations

import operator

import torch

from vramfx.capture import capture
from vramfx.plan.costs import CostModel
from vramfx.plan.liveness import build_liveness, compute_nodes
from vramfx.plan.schedule import minimum_budget, schedule
from vramfx.rewrite import ENGINE_INPUT, rewrite
from vramfx.runtime import ops


class Deep(torch.nn.Module):
    def __init__(self, depth: int = 6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def planned(budget_extra: int = 0):
    captured = capture(Deep(), (torch.randn(2, 64),))
    live = build_liveness(captured)
    budget = minimum_budget(live) + budget_extra
    plan = schedule(live, budget, cost_model=CostModel.for_device("cpu"), calls=4)
    return captured, plan


def test_weight_placeholders_are_replaced_by_the_engine_and_steps():
    captured, plan = planned()
    gm = rewrite(captured, plan)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[0] == ENGINE_INPUT
    assert len(placeholders) == 2, "the engine and the one user input"
    counts = {op: sum(1 for n in gm.graph.nodes if n.target is getattr(ops, op)) for op in ("fetch", "wait", "drop")}
    assert counts == {"fetch": len(plan.transfers), "wait": len(plan.transfers), "drop": len(plan.transfers)}
    assert all(n.target is not ops.resident for n in gm.graph.nodes) or plan.resident


def test_steps_sit_at_their_planned_positions_in_order():
    captured, plan = planned()
    gm = rewrite(captured, plan)
    original = [n.name for n in compute_nodes(captured.graph_module.graph)]
    seen_compute = 0
    steps_seen = []
    for node in gm.graph.nodes:
        meta = node.meta.get("vramfx", {})
        if meta.get("op") in ("fetch", "wait", "drop"):
            steps_seen.append((seen_compute, meta["op"], meta["transfer"]))
        elif node.op not in ("placeholder", "output") and node.target is not operator.getitem:
            assert node.name == original[seen_compute]
            seen_compute += 1
    expected = [(s.position, s.op, s.transfer) for s in plan.steps]
    assert steps_seen == expected


def test_every_weight_use_reads_the_transfer_that_covers_it():
    captured, plan = planned()
    gm = rewrite(captured, plan)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            weight = node.args[1]
            assert weight.target is operator.getitem and weight.args[0].target is ops.wait


def test_resident_weights_are_read_once_at_the_top():
    captured, plan = planned(budget_extra=64 * 65 * 4 * 3)
    assert plan.resident
    gm = rewrite(captured, plan)
    residents = [n for n in gm.graph.nodes if n.target is ops.resident]
    assert sorted(n.args[1] for n in residents) == sorted(plan.resident)
    first_compute = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is not ops.resident
                         and n.meta.get("vramfx", {}).get("op") not in ("fetch", "wait", "drop"))
    order = list(gm.graph.nodes)
    assert all(order.index(r) < order.index(first_compute) for r in residents)


def planned_low(budget_extra: int = 0):
    """``Deep`` with its layer weights (not biases) stored in fp8."""
    captured = capture(Deep(), (torch.randn(2, 64),))
    low = {w.name: torch.float8_e4m3fn for w in captured.weights if w.name.endswith("weight")}
    live = build_liveness(captured, storage_dtypes=low)
    plan = schedule(live, minimum_budget(live) + budget_extra, cost_model=CostModel.for_device("cpu"), calls=4)
    return captured, plan


def test_a_weight_stored_low_is_read_through_a_cast_right_after_what_brings_it():
    captured, plan = planned_low(budget_extra=3 * 64 * 64)
    assert plan.resident and plan.transfers
    gm = rewrite(captured, plan)
    casts = [n for n in gm.graph.nodes if n.target is ops.cast]
    assert len(casts) == len(plan.casts) == 6
    order = list(gm.graph.nodes)
    for node in casts:
        engine, stored, cast = node.args
        assert engine.name == ENGINE_INPUT and plan.casts[cast].name == node.meta["vramfx"]["name"]
        assert node.meta["val"].dtype == torch.float32
        assert stored.meta["val"].dtype == torch.float8_e4m3fn
        assert stored.target is ops.resident or stored.args[0].target is ops.wait
        (user,) = node.users  # the linear that reads the weight, right after the cast
        assert user.target is torch.ops.aten.linear.default and order.index(user) == order.index(node) + 1
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            assert node.args[1].target is ops.cast and node.args[2].target is not ops.cast  # biases stay


def test_the_rewritten_graph_with_casts_equals_eager_through_fp8():
    from vramfx.runtime.cpu import CpuEngine
    from vramfx.runtime.engine import ResidentStore
    from vramfx.weights import resolve_weights

    captured, plan = planned_low(budget_extra=3 * 64 * 64)
    gm = rewrite(captured, plan)
    storage = {w.name: torch.float8_e4m3fn for w in plan.weights if w.compute_dtype}
    engine = CpuEngine(plan, resolve_weights(captured.weights, None, storage=storage), torch.device("cpu"),
                       ResidentStore())
    engine.activate()
    x = torch.randn(2, 64)
    values = {w.name: w.value for w in captured.weights}
    expected = x
    for i in range(6):
        weight = values[f"layers.{i}.weight"].to(torch.float8_e4m3fn).float()
        expected = torch.tanh(torch.nn.functional.linear(expected, weight, values[f"layers.{i}.bias"]))
    engine.begin_call()
    (out,) = gm(engine, x)
    engine.end_call()
    engine.deactivate()
    assert torch.equal(out, expected)
