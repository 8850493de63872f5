"""The scheduler on small hand-made graphs and on random ones (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    UNIT_COSTS,
    cost_models,
    everything_fits,
    liveness,
    livenesses,
    schedule_knobs,
    stored_low,
    weight,
)

from vramfx.errors import BudgetError
from vramfx.plan.check import check_plan
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.plan.schedule import minimum_budget, schedule


def fetch_wait_drop(plan: Plan) -> list[tuple[tuple[str, ...], int, int, int]]:
    return [(t.names, t.fetch, t.wait, t.drop) for t in plan.transfers]


def three_in_a_row(flops: float = 2e6) -> object:
    """Weights a, b, c of 1000 bytes (1024 aligned) read at 0, 1, 2; each node 2 ms."""
    return liveness(
        3,
        [weight("a", 1000, 0), weight("b", 1000, 1), weight("c", 1000, 2)],
        flops=flops,
    )


# ---------------------------------------------------------------------------------------------
# Hand-made cases with known plans


def test_budget_that_fits_all_keeps_everything_resident_over_many_calls():
    lv = three_in_a_row(flops=0.0)  # no compute to hide copies behind
    plan = schedule(lv, 3 * 1024, cost_model=UNIT_COSTS, calls=10)
    assert plan.resident == ("a", "b", "c")
    assert plan.transfers == ()
    assert plan.streamed_bytes == 0
    assert plan.peak_bytes == plan.resident_bytes == 3 * 1024
    # Loading is paid once, on the first call only.
    assert plan.predicted.first_call_seconds == pytest.approx(3e-3)
    assert plan.predicted.seconds_per_call == pytest.approx(0.0)


def test_minimum_budget_streams_one_weight_at_a_time():
    lv = liveness(
        3,
        [weight("a", 1000, 0), weight("b", 1000, 1), weight("c", 1000, 2)],
        activations=[10, 30, 20],
        workspace_bytes=100,
        flops=2e6,
    )
    minimum = minimum_budget(lv, margin_bytes=7)
    assert minimum == 1024 + 30 + 100 + 7
    plan = schedule(lv, minimum, cost_model=UNIT_COSTS, margin_bytes=7)
    assert plan.resident == ()
    assert fetch_wait_drop(plan) == [(("a",), 0, 0, 1), (("b",), 1, 1, 2), (("c",), 2, 2, 3)]
    assert [t.offsets for t in plan.transfers] == [(0,), (0,), (0,)]
    assert plan.arena_bytes == 1024
    assert plan.peak_bytes == minimum
    assert plan.workspace_bytes == 107


def test_two_slot_arena_prefetches_the_next_weight_under_compute():
    # Copies take 1 ms, nodes 2 ms: with room for two weights each fetch runs one node ahead.
    lv = three_in_a_row()
    plan = schedule(lv, 2 * 1024, cost_model=UNIT_COSTS, coalesce_bytes=0)
    assert plan.resident == ()
    assert fetch_wait_drop(plan) == [(("a",), 0, 0, 1), (("b",), 0, 1, 2), (("c",), 1, 2, 3)]
    assert [t.offsets for t in plan.transfers] == [(0,), (1024,), (0,)]
    # Only the very first copy stalls: compute 6 ms + 1 ms waiting for a.
    assert plan.predicted.stall_seconds == pytest.approx(1e-3)
    assert plan.predicted.seconds_per_call == pytest.approx(7e-3)
    assert plan.predicted.transfer_seconds == pytest.approx(3e-3)


def test_steps_at_one_position_drop_before_fetch_before_wait():
    plan = schedule(three_in_a_row(), 1024, cost_model=UNIT_COSTS)
    at_one = [(s.op, s.names) for s in plan.steps if s.position == 1]
    assert at_one == [("drop", ("a",)), ("fetch", ("b",)), ("wait", ("b",))]


def test_weight_with_a_long_gap_is_dropped_and_fetched_again():
    # w (5000 B, 5 ms to copy) is read at 5 and 90. x0..x2 (5000 B each) are read back to back
    # at 40..42 after 1 ms nodes: with w held over the gap the arena has two slots for them and
    # x2 stalls; dropped at 6 and fetched again after 42, all three prefetch and nothing stalls.
    weights = [weight("a", 100, 0), weight("w", 5000, 5, 90)]
    weights += [weight(f"x{i}", 5000, 40 + i) for i in range(3)]
    lv = liveness(100, weights, flops=1e6)
    budget = 128 + 3 * 5056  # the split is not forced: the unsplit plan fits as well
    plan = schedule(lv, budget, cost_model=UNIT_COSTS, coalesce_bytes=4096)
    assert "w" not in plan.resident
    w_transfers = [(t.fetch, t.wait, t.drop) for t in plan.transfers if "w" in t.names]
    assert len(w_transfers) == 2
    assert w_transfers[0][1:] == (5, 6)
    assert w_transfers[1][1:] == (90, 91)
    assert w_transfers[1][0] >= 41  # fetched again once an x has been dropped
    # Only a's copy before position 0 can stall (unless a is loaded ahead, which costs the same).
    assert plan.predicted.stall_seconds <= 1e-4 + 1e-12


def test_weight_with_a_long_gap_stays_when_memory_is_not_contended():
    # Same w, nothing competing for the arena: refetching would move bytes for no time saved.
    weights = [weight("a", 100, 0), weight("w", 5000, 5, 90), weight("x", 1000, 45)]
    lv = liveness(100, weights, flops=1e6)
    plan = schedule(lv, everything_fits(lv, 64, 0), cost_model=UNIT_COSTS, coalesce_bytes=4096)
    assert [(t.wait, t.drop) for t in plan.transfers if "w" in t.names] == [(5, 91)]


def test_weight_with_a_short_gap_stays_in_the_arena():
    weights = [weight("a", 100, 0), weight("w", 5000, 5, 8), weight("x", 1000, 45)]
    lv = liveness(100, weights, flops=1e6)
    plan = schedule(lv, everything_fits(lv, 64, 0), cost_model=UNIT_COSTS, coalesce_bytes=4096)
    w_transfers = [(t.wait, t.drop) for t in plan.transfers if "w" in t.names]
    assert w_transfers == [(5, 9)]


def test_span_of_a_view_is_never_split():
    # w is read at 2 and 40 through one view alive over [2, 41): no drop in between.
    weights = [weight("w", 5000, 2, 40, spans=((2, 41),))]
    lv = liveness(50, weights, flops=1e6)
    plan = schedule(lv, 8192, cost_model=UNIT_COSTS, coalesce_bytes=0)
    assert [(t.wait, t.drop) for t in plan.transfers] == [(2, 41)]
    assert minimum_budget(lv) == 5056


def test_budget_forces_a_split_the_cost_model_would_not_choose():
    # u (3000 B) is read at 1 and 3 with a cheap gap; v (3000 B) is read at 2. Keeping u over
    # the gap needs room for both; at the minimum budget u must be dropped and fetched again.
    weights = [weight("u", 3000, 1, 3), weight("v", 3000, 2)]
    lv = liveness(4, weights, flops=0.0)
    minimum = minimum_budget(lv, coalesce_bytes=0)
    assert minimum == 3008
    plan = schedule(lv, minimum, cost_model=UNIT_COSTS, coalesce_bytes=0)
    assert fetch_wait_drop(plan) == [
        (("u",), 0, 1, 2),
        (("v",), 2, 2, 3),
        (("u",), 3, 3, 4),
    ]
    roomy = schedule(lv, 2 * 3008, cost_model=UNIT_COSTS, coalesce_bytes=0)
    assert sum("u" in t.names for t in roomy.transfers) + ("u" in roomy.resident) == 1


def test_small_weights_coalesce_into_one_transfer():
    # Four 100-byte norms read at 3..6 after 3 heavy nodes: one copy for all four.
    weights = [weight(f"n{i}", 100, 3 + i) for i in range(4)]
    lv = liveness(7, weights, flops=[1e7] * 3 + [0.0] * 4)
    plan = schedule(lv, 4096, cost_model=UNIT_COSTS, coalesce_bytes=4096, coalesce_positions=8)
    assert len(plan.transfers) == 1
    (tr,) = plan.transfers
    assert tr.names == ("n0", "n1", "n2", "n3")
    assert tr.offsets == (0, 128, 256, 384)  # 100 bytes each, aligned to 64
    assert tr.sizes == (100, 100, 100, 100)
    assert (tr.wait, tr.drop) == (3, 7)
    assert plan.streamed_bytes == 400
    assert plan.arena_bytes == 512


def test_coalescing_respects_the_position_window_and_byte_cap():
    # Copies have a fixed cost of 1 ms, so one copy for two weights beats two copies.
    costs = dataclasses.replace(UNIT_COSTS, link_latency_s=1e-3)
    weights = [weight(f"n{i}", 100, 3 * i + 1) for i in range(6)]
    lv = liveness(18, weights, flops=1e7)
    by_positions = schedule(lv, 4096, cost_model=costs, coalesce_bytes=4096, coalesce_positions=3)
    assert [t.names for t in by_positions.transfers] == [
        ("n0", "n1"),
        ("n2", "n3"),
        ("n4", "n5"),
    ]
    by_bytes = schedule(lv, 4096, cost_model=costs, coalesce_bytes=384, coalesce_positions=64)
    assert [t.names for t in by_bytes.transfers] == [
        ("n0", "n1", "n2"),
        ("n3", "n4", "n5"),
    ]


def test_zero_byte_and_unread_weights():
    weights = [weight("empty", 0, 1), weight("w", 1000, 2)]
    unread = weight("unread", 500, 0)
    unread = type(unread)("unread", 500, (), (), (500,), "uint8")
    lv = liveness(3, [*weights, unread], flops=1e6)
    plan = schedule(lv, 1024, cost_model=UNIT_COSTS)
    assert "empty" in plan.resident
    assert "unread" not in plan.resident
    assert all("unread" not in t.names for t in plan.transfers)
    assert plan.weight_bytes == 1500
    assert [w.name for w in plan.weights] == ["empty", "w", "unread"]


def test_no_weights_at_all():
    lv = liveness(2, [], activations=[5, 9])
    assert minimum_budget(lv) == 9
    plan = schedule(lv, 9, cost_model=UNIT_COSTS)
    assert plan.transfers == () and plan.resident == () and plan.peak_bytes == 9


# ---------------------------------------------------------------------------------------------
# Residency is chosen by cost


def test_weight_fetched_twice_is_made_resident_before_an_earlier_one():
    # a is read first (a first-come policy keeps a); b is read at 4 and 8 and would be copied
    # twice per call. Nodes are light, so every copy stalls: keeping b saves two, a only one.
    weights = [weight("a", 1000, 2), weight("b", 1000, 4, 8), weight("c", 1000, 6)]
    lv = liveness(10, weights, flops=1e5)
    budget = 2 * 1024  # one resident weight plus a one-weight arena
    plan = schedule(lv, budget, cost_model=UNIT_COSTS, calls=10, coalesce_bytes=512)
    assert plan.resident == ("b",)
    assert [t.names for t in plan.transfers] == [("a",), ("c",)]


def test_weight_that_stalls_is_made_resident_before_an_earlier_hidden_one():
    # a (1000 B) is read at 1 after a 2 ms node: its 1 ms copy hides. b (4000 B, 4 ms to copy)
    # is read at 3 after light nodes: streamed, it stalls whatever the window. Room for b plus
    # one small slot: keeping b resident removes the stall, keeping a (first come) does not.
    weights = [weight("a", 1000, 1), weight("b", 4000, 3), weight("c", 1000, 6)]
    flops = [2e6] + [1e5] * 7
    lv = liveness(8, weights, flops=flops)
    budget = 4096 + 1024
    plan = schedule(lv, budget, cost_model=UNIT_COSTS, calls=20, coalesce_bytes=0)
    assert plan.resident == ("b",)
    assert [t.names for t in plan.transfers] == [("a",), ("c",)]


def test_single_call_prefers_streaming_hidden_copies_to_loading():
    # With one call a resident weight is a copy nobody can hide; streamed ones hide.
    weights = [weight("a", 1000, 0), weight("b", 5000, 10), weight("c", 5000, 20)]
    lv = liveness(30, weights, flops=1e6)
    plan = schedule(lv, everything_fits(lv, 64, 0), cost_model=UNIT_COSTS, calls=1)
    assert "b" not in plan.resident and "c" not in plan.resident
    # 30 ms of compute plus a's copy, which nothing can hide (streamed or loaded ahead).
    assert plan.predicted.first_call_seconds == pytest.approx(0.031)


# ---------------------------------------------------------------------------------------------
# Errors


def test_budget_error_names_budget_and_minimum():
    lv = liveness(
        3,
        [weight("a", 10 * 2**20, 0), weight("b", 30 * 2**20, 1)],
        activations=2 * 2**20,
    )
    minimum = minimum_budget(lv)
    below = r"budget 1\.0 MiB .* below the minimum of 32\.0 MiB"
    with pytest.raises(BudgetError, match=below) as e:
        schedule(lv, 2**20, cost_model=UNIT_COSTS)
    assert e.value.minimum_bytes == minimum == 32 * 2**20
    assert "activations 2.0 MiB" in str(e.value)
    assert "largest weights needed at once 30.0 MiB" in str(e.value)
    assert f"budget_bytes >= {minimum}" in str(e.value)
    with pytest.raises(BudgetError):
        schedule(lv, minimum - 1, cost_model=UNIT_COSTS)
    schedule(lv, minimum, cost_model=UNIT_COSTS)


def test_budget_below_activations_is_a_budget_error():
    lv = liveness(2, [], activations=[100, 200])
    with pytest.raises(BudgetError, match="activations 200 B") as e:
        schedule(lv, 150, cost_model=UNIT_COSTS)
    assert e.value.minimum_bytes == 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calls": 0}, "calls"),
        ({"alignment": 48}, "alignment"),
        ({"margin_bytes": -1}, "margin_bytes"),
        ({"coalesce_bytes": -1}, "coalesce_bytes"),
        ({"budget_bytes": -5}, "budget_bytes"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    args = {"budget_bytes": 4096, "cost_model": UNIT_COSTS, **kwargs}
    with pytest.raises(ValueError, match=match):
        schedule(three_in_a_row(), **args)


def test_malformed_liveness_is_rejected():
    lv = liveness(3, [weight("a", 10, 1, spans=((0, 1),))])
    with pytest.raises(ValueError, match="lies in none of its spans"):
        schedule(lv, 4096, cost_model=UNIT_COSTS)
    bad = liveness(3, [weight("a", 10, 1)])
    bad = type(bad)(3, bad.weights, (0, 0), (0.0,) * 3, (0,) * 3)
    with pytest.raises(ValueError, match="activation_bytes"):
        minimum_budget(bad)


def test_plans_are_reproducible():
    lv = liveness(
        40,
        [weight(f"w{i}", 1000 * (i + 1), 2 * i, 2 * i + 17) for i in range(10)],
        flops=[1e5 * (t % 7) for t in range(40)],
    )
    cm = CostModel.for_device("cpu")
    first = schedule(lv, 20_000, cost_model=cm, calls=5)
    assert schedule(lv, 20_000, cost_model=cm, calls=5) == first


# ---------------------------------------------------------------------------------------------
# Random graphs


@st.composite
def planning_problems(draw: st.DrawFn):
    lv = draw(livenesses())
    knobs = draw(schedule_knobs)
    minimum = minimum_budget(lv, **knobs)
    roomy = everything_fits(lv, knobs["alignment"], knobs["margin_bytes"])
    budget = minimum + draw(st.integers(0, max(roomy - minimum, 0) + 1000))
    return lv, knobs, minimum, budget


@given(planning_problems(), cost_models, st.integers(1, 50))
def test_random_plans_pass_the_checker_and_round_trip(problem, cost_model, calls):
    lv, knobs, minimum, budget = problem
    plan = schedule(lv, budget, cost_model=cost_model, calls=calls, **knobs)
    check_plan(plan, lv)
    assert plan.peak_bytes <= budget
    assert Plan.from_json(plan.to_json()) == plan


@given(livenesses(), schedule_knobs, cost_models)
def test_minimum_budget_is_exact(lv, knobs, cost_model):
    minimum = minimum_budget(lv, **knobs)
    plan = schedule(lv, minimum, cost_model=cost_model, **knobs)
    check_plan(plan, lv)
    if minimum > 0:
        with pytest.raises(BudgetError) as e:
            schedule(lv, minimum - 1, cost_model=cost_model, **knobs)
        assert e.value.minimum_bytes == minimum


def byte_ranges(tr) -> list[tuple[int, int]]:
    """The arena bytes ``[begin, end)`` a transfer's non-empty members occupy."""
    return [(offset, offset + size) for offset, size in zip(tr.offsets, tr.sizes) if size]


def replay(plan: Plan, lv) -> None:
    """Run ``plan.steps`` in the order the rewritten graph runs them and check every node's reads.

    Independent of :func:`check_plan`: it tracks the arena byte by byte as the runtime would use
    it, so a plan whose fields pass the checker but whose step order breaks a use still fails.
    """
    alignment = plan.alignment
    by_position: dict[int, list] = {}
    for step in plan.steps:
        by_position.setdefault(step.position, []).append(step)
    transfers = {t.id: t for t in plan.transfers}
    live: dict[int, bool] = {}  # transfer id -> waited for
    holder_at_span_start: dict[tuple[str, int], int] = {}
    for t in range(plan.num_positions + 1):
        for step in by_position.get(t, ()):
            if step.op == "cast":  # reads the stored weight: resident, or brought by a waited transfer
                (name,) = step.names
                assert name in plan.resident or live.get(step.transfer) and name in transfers[step.transfer].names, (
                    f"{name!r} is cast at {t} before it is ready")
                continue
            tr = transfers[step.transfer]
            if step.op == "fetch":
                assert tr.id not in live, f"transfer {tr.id} fetched while still live"
                taken = [(begin, end, i) for i in live for begin, end in byte_ranges(transfers[i])]
                for begin, end in byte_ranges(tr):
                    clash = [i for b, e, i in taken if b < end and begin < e]
                    assert not clash, f"transfer {tr.id} is fetched at {t} over live {clash}"
                live[tr.id] = False
            elif step.op == "wait":
                assert tr.id in live, f"transfer {tr.id} waited for before its fetch"
                live[tr.id] = True
            elif step.op == "drop":
                assert live.pop(tr.id, None) is not None, f"transfer {tr.id} dropped while not live"
        if t == plan.num_positions:
            break
        in_arena = sum(-(-s // alignment) * alignment for i in live for s in transfers[i].sizes)
        assert in_arena <= plan.arena_bytes
        used = plan.resident_bytes + in_arena + plan.upcast_bytes + lv.activation_bytes[t] + plan.workspace_bytes
        assert used <= plan.budget_bytes, f"over budget at {t}: {used} > {plan.budget_bytes}"
        for w in lv.weights:
            if t not in w.uses or w.name in plan.resident:
                continue
            holders = [i for i, ready in live.items() if ready and w.name in transfers[i].names]
            assert len(holders) == 1, f"{w.name!r} is read at {t} but held ready by {holders}"
            begin = next(b for b, e in w.spans if b <= t < e)
            first = holder_at_span_start.setdefault((w.name, begin), holders[0])
            assert first == holders[0], f"{w.name!r} moved inside its span starting at {begin}"
    assert not live, f"transfers {sorted(live)} are never dropped"


@given(planning_problems(), cost_models, st.integers(1, 50))
def test_replaying_the_steps_reads_every_weight_ready_and_in_budget(problem, cost_model, calls):
    lv, knobs, _, budget = problem
    replay(schedule(lv, budget, cost_model=cost_model, calls=calls, **knobs), lv)


@given(planning_problems(), cost_models, st.data())
def test_replaying_plans_with_weights_stored_low_casts_each_ready_weight(problem, cost_model, data):
    lv, knobs, _, _ = problem
    low = stored_low(lv, data.draw(st.sets(st.sampled_from([w.name for w in lv.weights] or [""]))))
    budget = minimum_budget(low, **knobs) + data.draw(st.integers(0, low.weight_bytes))
    plan = schedule(low, budget, cost_model=cost_model, calls=data.draw(st.integers(1, 50)), **knobs)
    replay(plan, low)
    assert sum(s.op == "cast" for s in plan.steps) == sum(len(w.spans) for w in low.weights if w.compute_dtype)


@given(livenesses(), schedule_knobs, cost_models, st.integers(1, 50), st.data())
def test_every_budget_below_the_minimum_reports_the_same_minimum(lv, knobs, cost_model, calls, data):
    # A caller retries with BudgetError.minimum_bytes from whatever budget failed (often 1 B),
    # so it must not depend on how far below, nor on the cost model or the call count.
    minimum = minimum_budget(lv, **knobs)
    assume(minimum > 0)
    below = data.draw(st.integers(0, minimum - 1))
    with pytest.raises(BudgetError) as e:
        schedule(lv, below, cost_model=cost_model, calls=calls, **knobs)
    assert e.value.minimum_bytes == minimum
    plan = schedule(lv, minimum, cost_model=cost_model, calls=calls, **knobs)
    check_plan(plan, lv)
    replay(plan, lv)


def test_replay_catches_a_late_wait_and_an_overlap():
    lv = three_in_a_row()
    plan = schedule(lv, 2 * 1024, cost_model=UNIT_COSTS, coalesce_bytes=0)
    replay(plan, lv)
    a, b, c = plan.transfers
    late = dataclasses.replace(plan, transfers=(a, dataclasses.replace(b, wait=2, drop=3), c))
    with pytest.raises(AssertionError, match="'b' is read at 1 but held ready by"):
        replay(late, lv)
    clash = dataclasses.replace(plan, transfers=(a, dataclasses.replace(b, offsets=(0,)), c))
    with pytest.raises(AssertionError, match="transfer 1 is fetched at 0 over live"):
        replay(clash, lv)
