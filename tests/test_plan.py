"""The Plan record: steps, JSON round trip, human summary and unit formatting."""

from __future__ import annotations

import json

import pytest
from strategies import UNIT_COSTS, liveness, stored_low, weight

from vramfx.plan.plan import STEP_ORDER, Plan
from vramfx.plan.schedule import schedule
from vramfx.util import format_bytes, format_seconds


@pytest.fixture
def plan() -> Plan:
    # Eight weights of growing size through a two-slot arena; one zero-byte weight resident.
    weights = [weight(f"layer{i}.weight", 1000 * (i + 1), 2 * i + 1) for i in range(8)]
    weights.append(weight("scale", 0, 3))
    lv = liveness(17, weights, activations=50, flops=1e6)
    return schedule(lv, 8192 + 7232 + 50, cost_model=UNIT_COSTS, coalesce_bytes=0)


def test_json_round_trip_is_exact(plan):
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json(indent=2)) == plan
    data = json.loads(plan.to_json())
    assert data["steps"][0]["op"] in STEP_ORDER
    assert data["position_names"][0] == "node0"


def test_steps_come_in_execution_order(plan):
    steps = plan.steps
    assert len(steps) == 3 * len(plan.transfers)
    keys = [(s.position, STEP_ORDER[s.op]) for s in steps]
    assert keys == sorted(keys)
    for tr in plan.transfers:
        mine = [s for s in steps if s.transfer == tr.id]
        assert [(s.op, s.position) for s in mine] == [
            ("fetch", tr.fetch),
            ("wait", tr.wait),
            ("drop", tr.drop),
        ]
        assert all(s.nbytes == tr.nbytes and s.names == tr.names for s in mine)


def test_summary_lists_memory_time_and_largest_transfers(plan):
    text = plan.summary()
    for label in ("budget", "planned peak", "resident", "arena", "activations", "workspace",
                  "weights", "streamed", "predicted", "first call", "largest transfers"):
        assert label in text
    assert format_bytes(plan.budget_bytes) in text
    assert f"{len(plan.transfers)} transfers" in text
    listed = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(listed) == 5
    assert "layer7.weight" in listed[0]  # the largest first
    assert "layer2.weight" not in text  # only the five largest are listed
    assert plan.summary(largest=2).count("#") == 2


def test_summary_of_a_plan_with_nothing_streamed():
    lv = liveness(2, [weight("a", 100, 0)])
    text = schedule(lv, 4096, cost_model=UNIT_COSTS, calls=10).summary()
    assert "largest transfers" not in text
    assert "0 transfers" in text


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (39_006_619, "37.2 MiB"),
        (2**33, "8.00 GiB"),
        (-2048, "-2.0 KiB"),
        (2**20 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (2**30 - 1, "1.00 GiB"),
    ],
)
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text


def test_format_bytes_rounds_minimums_up():
    assert format_bytes(39_017_841) == "37.2 MiB"  # 37.21 MiB
    assert format_bytes(39_017_841, round_up=True) == "37.3 MiB"
    assert format_bytes(1025, round_up=True) == "1.1 KiB"
    assert format_bytes(2**20, round_up=True) == "1.0 MiB"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.50 s"), (0.0123, "12.3 ms"), (4.5e-5, "45.0 µs"), (0.0, "0.00 s")],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_casts_are_steps_that_survive_json_and_show_in_the_summary():
    lv = stored_low(liveness(6, [weight("a", 1000, 0, 4), weight("b", 1000, 2), weight("n", 10, 3)]), {"a", "b"})
    plan = schedule(lv, 12_000, cost_model=UNIT_COSTS, calls=10, coalesce_bytes=0)
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.name_to_weight["a"].compute_dtype == "float32" and plan.name_to_weight["n"].compute_dtype is None
    casts = [s for s in plan.steps if s.op == "cast"]
    assert [(s.names, s.position, s.nbytes) for s in casts] == [(("a",), 0, 4000), (("b",), 2, 4000), (("a",), 4, 4000)]
    for s in casts:
        wait = next((w for w in plan.steps if w.op == "wait" and s.names[0] in w.names and w.transfer == s.transfer), None)
        assert s.transfer == -1 and s.names[0] in plan.resident or wait.position <= s.position
    keys = [(s.position, STEP_ORDER[s.op]) for s in plan.steps]
    assert keys == sorted(keys)
    assert "casts         3 per call (uint8 -> float32) of 2 weights stored low, 11.7 KiB written" in plan.summary()
    legacy = json.loads(plan.to_json())
    del legacy["casts"]
    for w in legacy["weights"]:
        del w["compute_dtype"]
    assert Plan.from_dict(legacy).casts == ()
