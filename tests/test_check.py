"""The invariant checker catches every kind of broken plan, one test per invariant."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import UNIT_COSTS, everything_fits, liveness, livenesses, schedule_knobs, stored_low, weight

from vramfx.errors import PlanInvariantError
from vramfx.plan.check import check_plan
from vramfx.plan.plan import Plan, Transfer
from vramfx.plan.schedule import minimum_budget, schedule

replace = dataclasses.replace


@pytest.fixture
def case() -> tuple[Plan, object]:
    """A plan with a zero-byte resident weight, a coalesced group and a two-use span."""
    weights = [
        weight("emb", 8000, 0, 29),  # read at both ends: fetched twice or resident
        weight("w1", 3000, 2, 3, spans=((2, 4),)),  # a view alive over [2, 4)
        weight("n1", 100, 5),
        weight("n2", 100, 6),
        weight("w2", 3000, 10),
        weight("w3", 3000, 20),
        weight("zero", 0, 21),
    ]
    lv = liveness(30, weights, activations=[100 * (t % 4) for t in range(30)], flops=1e6)
    plan = schedule(lv, 8064 + 2 * 3008 + 300, cost_model=UNIT_COSTS, calls=1, coalesce_bytes=512)
    check_plan(plan, lv)
    return plan, lv


def transfer_of(plan: Plan, name: str, nth: int = 0) -> Transfer:
    return [t for t in plan.transfers if name in t.names][nth]


def with_transfer(plan: Plan, old: Transfer, new: Transfer) -> Plan:
    return replace(plan, transfers=tuple(new if t is old else t for t in plan.transfers))


def test_the_fixture_exercises_every_feature(case):
    plan, lv = case
    assert "zero" in plan.resident
    assert any(len(t.names) > 1 for t in plan.transfers)  # n1 + n2 coalesced
    assert len(plan.transfers) >= 4
    assert any(t.fetch < t.wait for t in plan.transfers)  # prefetching happens


# ---------------------------------------------------------------------------------------------
# over budget


def test_over_budget_peak_above_budget(case):
    plan, lv = case
    with pytest.raises(PlanInvariantError, match="over budget: peak_bytes .* > budget_bytes"):
        check_plan(replace(plan, budget_bytes=plan.peak_bytes - 1), lv)


def test_over_budget_peak_not_the_sum_of_its_parts(case):
    plan, lv = case
    with pytest.raises(PlanInvariantError, match="over budget: peak_bytes .* != resident"):
        check_plan(replace(plan, peak_bytes=plan.peak_bytes - 64), lv)


def test_over_budget_arena_too_small_for_what_is_live(case):
    plan, lv = case
    # Arena shrunk so the members no longer fit inside it.
    shrunk = replace(plan, arena_bytes=plan.arena_bytes - 64, peak_bytes=plan.peak_bytes - 64)
    with pytest.raises(PlanInvariantError, match="arena overlap: .* outside the arena"):
        check_plan(shrunk, lv)


# ---------------------------------------------------------------------------------------------
# not ready before use


def test_not_ready_wait_after_first_use(case):
    plan, lv = case
    tr = transfer_of(plan, "w1")  # read at 2 and 3
    late = replace(tr, wait=3)
    with pytest.raises(PlanInvariantError, match="not ready before use: .*'w1' is read at 2"):
        check_plan(with_transfer(plan, tr, late), lv)


def test_not_ready_second_copy_missing():
    # u is read at 1 and 3 and must be fetched twice at the minimum budget; lose the refetch.
    lv = liveness(4, [weight("u", 3000, 1, 3), weight("v", 3000, 2)])
    plan = schedule(lv, minimum_budget(lv), cost_model=UNIT_COSTS, coalesce_bytes=0)
    second = transfer_of(plan, "u", 1)
    broken = replace(
        plan,
        transfers=tuple(t for t in plan.transfers if t is not second),
        streamed_bytes=plan.streamed_bytes - second.nbytes,
    )
    with pytest.raises(PlanInvariantError, match="not ready before use: .*'u' is read at 3, but"):
        check_plan(broken, lv)


def test_weight_never_fetched(case):
    plan, lv = case
    tr = transfer_of(plan, "w3")
    broken = replace(
        plan,
        transfers=tuple(t for t in plan.transfers if t is not tr),
        streamed_bytes=plan.streamed_bytes - tr.nbytes,
    )
    with pytest.raises(PlanInvariantError, match="neither resident nor streamed: .*'w3'"):
        check_plan(broken, lv)


def test_not_ready_use_covered_by_two_transfers(case):
    plan, lv = case
    tr = transfer_of(plan, "w3")
    twin = replace(tr, id=max(t.id for t in plan.transfers) + 1)
    broken = replace(plan, transfers=(*plan.transfers, twin))
    with pytest.raises(PlanInvariantError, match="not ready before use: .*exactly one transfer"):
        check_plan(broken, lv)


def test_not_ready_useless_fetch(case):
    plan, lv = case
    tr = transfer_of(plan, "w3")
    # A second copy of w3 over a stretch where nothing reads it.
    end = plan.num_positions
    extra = replace(tr, id=99, fetch=25, wait=25, drop=26, offsets=(0,))
    broken = replace(plan, transfers=(*plan.transfers, extra))
    broken = replace(broken, streamed_bytes=broken.streamed_bytes + extra.nbytes)
    assert end > 26
    with pytest.raises(PlanInvariantError, match="not ready before use: .*never read"):
        check_plan(broken, lv)


# ---------------------------------------------------------------------------------------------
# dropped before last use


def test_dropped_inside_a_span(case):
    plan, lv = case
    tr = transfer_of(plan, "w1")
    assert (tr.wait, tr.drop) == (2, 4)
    with pytest.raises(PlanInvariantError, match="dropped before last use: .*'w1' at 3, inside"):
        check_plan(with_transfer(plan, tr, replace(tr, drop=3)), lv)


def test_dropped_after_the_last_position(case):
    plan, lv = case
    tr = transfer_of(plan, "w3")
    with pytest.raises(PlanInvariantError, match="dropped before last use: .*past the last"):
        check_plan(with_transfer(plan, tr, replace(tr, drop=plan.num_positions + 1)), lv)


# ---------------------------------------------------------------------------------------------
# arena overlap


def test_arena_overlap_between_live_transfers(case):
    plan, lv = case
    a, b = transfer_of(plan, "w2"), transfer_of(plan, "w3")
    assert b.fetch < a.drop and a.fetch < b.drop  # alive at the same time, same size
    moved = replace(b, offsets=a.offsets)
    with pytest.raises(PlanInvariantError, match="arena overlap: .* overlaps"):
        check_plan(with_transfer(plan, b, moved), lv)


def test_arena_overlap_within_one_transfer(case):
    plan, lv = case
    tr = next(t for t in plan.transfers if len(t.names) > 1)
    squashed = replace(tr, offsets=(tr.offsets[0],) * len(tr.names))
    with pytest.raises(PlanInvariantError, match="arena overlap: .* overlaps"):
        check_plan(with_transfer(plan, tr, squashed), lv)


def test_arena_misaligned_offset(case):
    plan, lv = case
    tr = transfer_of(plan, "w2")
    shifted = replace(tr, offsets=(tr.offsets[0] + 1,))
    with pytest.raises(PlanInvariantError, match="arena overlap: .*not a multiple of alignment"):
        check_plan(with_transfer(plan, tr, shifted), lv)


def test_reusing_bytes_after_a_drop_is_fine():
    # Lifetimes [0, 1), [1, 2), [2, 3) only touch: all three may sit at offset 0.
    lv = liveness(3, [weight("a", 1000, 0), weight("b", 1000, 1), weight("c", 1000, 2)])
    plan = schedule(lv, 1024, cost_model=UNIT_COSTS)
    assert [t.offsets for t in plan.transfers] == [(0,), (0,), (0,)]
    check_plan(plan, lv)
    # Fetching b one position earlier makes it meet a.
    b = plan.transfers[1]
    with pytest.raises(PlanInvariantError, match="arena overlap: 'b' .* overlaps 'a'"):
        check_plan(with_transfer(plan, b, replace(b, fetch=0)), lv)


# ---------------------------------------------------------------------------------------------
# resident weights never dropped; every weight resident or streamed


def test_resident_weight_dropped(case):
    plan, lv = case
    streamed = transfer_of(plan, "w3")
    resident = replace(plan, resident=(*plan.resident, "w3"))
    resident = replace(
        resident,
        resident_bytes=plan.resident_bytes + 3008,
        peak_bytes=plan.peak_bytes + 3008,
        budget_bytes=plan.budget_bytes + 3008,
    )
    assert "w3" in streamed.names
    with pytest.raises(PlanInvariantError, match="resident weight dropped: .*'w3'"):
        check_plan(resident, lv)


def test_weight_neither_resident_nor_streamed(case):
    plan, lv = case
    kept = tuple(n for n in plan.resident if n != "zero")
    with pytest.raises(PlanInvariantError, match="weight neither resident nor streamed: .*'zero'"):
        check_plan(replace(plan, resident=kept), lv)


def test_transfer_of_an_unknown_weight(case):
    plan, lv = case
    tr = transfer_of(plan, "w3")
    with pytest.raises(PlanInvariantError, match="neither resident nor streamed: .*'ghost'"):
        check_plan(with_transfer(plan, tr, replace(tr, names=("ghost",))), lv)


# ---------------------------------------------------------------------------------------------
# summary numbers and well-formedness


@pytest.mark.parametrize(
    ("field", "delta", "match"),
    [
        ("streamed_bytes", 1, "streamed_bytes"),
        ("weight_bytes", 1, "weight_bytes"),
    ],
)
def test_summary_totals_disagree(case, field, delta, match):
    plan, lv = case
    broken = replace(plan, **{field: getattr(plan, field) + delta})
    with pytest.raises(PlanInvariantError, match=f"summary disagrees: {match}"):
        check_plan(broken, lv)


def test_summary_resident_bytes_disagree(case):
    plan, lv = case
    broken = replace(
        plan,
        resident_bytes=plan.resident_bytes + 64,
        peak_bytes=plan.peak_bytes + 64,
        budget_bytes=plan.budget_bytes + 64,
    )
    with pytest.raises(PlanInvariantError, match="summary disagrees: resident_bytes"):
        check_plan(broken, lv)


def test_summary_prediction_does_not_add_up(case):
    plan, lv = case
    p = plan.predicted
    broken = replace(plan, predicted=replace(p, seconds_per_call=p.seconds_per_call * 2 + 1))
    with pytest.raises(PlanInvariantError, match="summary disagrees: predicted seconds_per_call"):
        check_plan(broken, lv)
    early = replace(plan, predicted=replace(p, first_call_seconds=p.seconds_per_call / 2))
    with pytest.raises(PlanInvariantError, match="first_call_seconds"):
        check_plan(early, lv)


def test_malformed_transfer_fetch_after_wait(case):
    plan, lv = case
    tr = transfer_of(plan, "w2")
    with pytest.raises(PlanInvariantError, match="malformed transfer: .*fetch"):
        check_plan(with_transfer(plan, tr, replace(tr, fetch=tr.wait + 1)), lv)


def test_malformed_transfer_wrong_size(case):
    plan, lv = case
    tr = transfer_of(plan, "w2")
    with pytest.raises(PlanInvariantError, match="malformed transfer: .*moves 5 B of 'w2'"):
        check_plan(with_transfer(plan, tr, replace(tr, sizes=(5,))), lv)


def test_malformed_transfer_order(case):
    plan, lv = case
    with pytest.raises(PlanInvariantError, match="malformed transfer: .*fetch order"):
        check_plan(replace(plan, transfers=plan.transfers[::-1]), lv)


def test_plan_for_another_graph(case):
    plan, lv = case
    other = liveness(30, [weight("x", 10, 1)])
    with pytest.raises(PlanInvariantError, match="plan does not match liveness"):
        check_plan(plan, other)


# ---------------------------------------------------------------------------------------------
# random plans, randomly broken


@given(livenesses(max_positions=25, max_weights=8), schedule_knobs, st.data())
def test_shifting_any_wait_past_its_use_is_caught(lv, knobs, data):
    roomy = everything_fits(lv, knobs["alignment"], knobs["margin_bytes"])
    budget = minimum_budget(lv, **knobs) + data.draw(st.integers(0, roomy))
    plan = schedule(lv, budget, cost_model=UNIT_COSTS, **knobs)
    assume(plan.transfers)
    tr = data.draw(st.sampled_from(plan.transfers))
    if tr.wait + 1 >= tr.drop:
        broken = replace(tr, drop=tr.wait)  # the drop before the first use
    else:
        broken = replace(tr, wait=tr.wait + 1, fetch=max(tr.fetch, tr.wait + 1))
    with pytest.raises(PlanInvariantError):
        check_plan(with_transfer(plan, tr, broken), lv)


# ---------------------------------------------------------------------------------------------
# casts of weights stored low


@pytest.fixture
def low_case(case):
    _, lv = case
    low = stored_low(lv, {"emb", "w1", "w2"})
    plan = schedule(low, 8064 + 2 * 3008 + 300 + 4 * 8000, cost_model=UNIT_COSTS, calls=10, coalesce_bytes=512)
    check_plan(plan, low)
    return plan, low


def test_every_span_of_a_weight_stored_low_starts_with_its_cast(low_case):
    plan, lv = low_case
    spans = {(w.name, b, e) for w in lv.weights if w.compute_dtype for b, e in w.spans}
    assert {(c.name, c.position, c.end) for c in plan.casts} == spans
    assert len(plan.casts) == 4  # emb twice, w1 over its view, w2 once
    holders = {s.transfer for s in plan.steps if s.op == "cast"}
    assert -1 in holders and len(holders) > 1, "casts of resident and of streamed weights"


def test_cast_missing_moved_or_misweighted_is_caught(low_case):
    plan, lv = low_case
    first = plan.casts[0]
    for broken in (
        plan.casts[1:],
        (replace(first, position=first.position + 1), *plan.casts[1:]),
        (replace(first, nbytes=first.nbytes - 1), *plan.casts[1:]),
        (*plan.casts, replace(first, name="w3")),
    ):
        with pytest.raises(PlanInvariantError, match="cast misplaced: "):
            check_plan(replace(plan, casts=broken), lv)


def test_a_planned_compute_dtype_that_liveness_does_not_have_is_caught(low_case):
    plan, lv = low_case
    weights = tuple(replace(w, compute_dtype=None) if w.name == "w2" else w for w in plan.weights)
    with pytest.raises(PlanInvariantError, match="cast misplaced: weight 'w2' is planned as"):
        check_plan(replace(plan, weights=weights), lv)


def test_cast_buffers_sharing_bytes_or_outside_the_region_are_caught():
    # a is viewed over [0, 3) while b is read at 1: both upcast copies are alive at once.
    lv = stored_low(liveness(4, [weight("a", 1000, 0, 2, spans=((0, 3),)), weight("b", 1000, 1)]), {"a", "b"})
    plan = schedule(lv, 20_000, cost_model=UNIT_COSTS)
    a, b = plan.casts
    assert a.offset != b.offset and plan.upcast_bytes == 2 * 4032
    shared = (a, replace(b, offset=a.offset))
    with pytest.raises(PlanInvariantError, match="cast overlap: the cast of 'b' at 1 .* overlaps the one of 'a'"):
        check_plan(replace(plan, casts=shared), lv)
    with pytest.raises(PlanInvariantError, match="cast overlap: .* outside the upcast region"):
        check_plan(replace(plan, upcast_bytes=plan.upcast_bytes - 64, peak_bytes=plan.peak_bytes - 64), lv)
    with pytest.raises(PlanInvariantError, match="cast overlap: .* not aligned"):
        check_plan(replace(plan, casts=(a, replace(b, offset=b.offset + 8))), lv)


def test_the_upcast_region_counts_in_the_peak(low_case):
    plan, lv = low_case
    assert plan.upcast_bytes > 0
    with pytest.raises(PlanInvariantError, match=r"over budget: peak_bytes .* \+ upcast"):
        check_plan(replace(plan, peak_bytes=plan.peak_bytes - plan.upcast_bytes), lv)


@given(livenesses(max_positions=25, max_weights=8), schedule_knobs, st.data())
def test_random_plans_with_weights_stored_low_check_and_cast_every_span(lv, knobs, data):
    names = data.draw(st.sets(st.sampled_from([w.name for w in lv.weights]))) if lv.weights else set()
    low = stored_low(lv, names)
    roomy = everything_fits(low, knobs["alignment"], knobs["margin_bytes"])
    budget = minimum_budget(low, **knobs) + data.draw(st.integers(0, roomy))
    plan = schedule(low, budget, cost_model=UNIT_COSTS, **knobs)  # runs check_plan
    assert len(plan.casts) == sum(len(w.spans) for w in low.weights if w.name in names)
    names_of = {t.id: t.names for t in plan.transfers}
    casts = [s for s in plan.steps if s.op == "cast"]
    assert all(s.names[0] in (plan.resident if s.transfer == -1 else names_of[s.transfer]) for s in casts)
