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
