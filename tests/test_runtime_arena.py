"""Which drops a fetch waits for: the last previous holder of each of its arena bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from strategies import UNIT_COSTS, liveness, livenesses, weight

from vramfx.plan.schedule import minimum_budget, schedule
from vramfx.runtime.arena import fetch_order, reserved_ranges, reuse_predecessors


def brute_force(plan) -> dict[int, tuple[int, ...]]:
    """The same question answered byte by byte, over two calls."""
    owner = np.full(max(plan.arena_bytes, 1), -1)
    by_id = {t.id: t for t in plan.transfers}
    result = {}
    for call in range(2):
        for tid in fetch_order(plan):
            found = set()
            for start, end in reserved_ranges(by_id[tid], plan.alignment, plan.arena_bytes):
                found.update(int(o) for o in np.unique(owner[start:end]) if o >= 0)
                owner[start:end] = tid
            if call == 1:
                result[tid] = tuple(sorted(found))
    return result


def one_slot_plan():
    """Three 1000-byte weights read one after another, a budget for one at a time."""
    lv = liveness(3, [weight("a", 1000, 0), weight("b", 1000, 1), weight("c", 1000, 2)], flops=2e6)
    return schedule(lv, minimum_budget(lv, alignment=256), cost_model=UNIT_COSTS, calls=1, alignment=256)


def test_transfers_taking_turns_in_one_slot_wait_for_each_other():
    plan = one_slot_plan()
    assert len({t.offsets for t in plan.transfers}) == 1, "all three share one slot"
    a, b, c = (t.id for t in plan.transfers)
    assert reuse_predecessors(plan) == {a: (c,), b: (a,), c: (b,)}


def test_a_transfer_alone_in_its_bytes_waits_for_its_own_previous_drop():
    plan = one_slot_plan()
    spread = dataclasses.replace(
        plan,
        transfers=tuple(dataclasses.replace(t, offsets=(1024 * i,)) for i, t in enumerate(plan.transfers)),
        arena_bytes=1024 * len(plan.transfers),
    )
    assert reuse_predecessors(spread) == {t.id: (t.id,) for t in plan.transfers}


@given(livenesses(max_positions=24, max_weights=10), st.integers(0, 20_000), st.sampled_from([1, 64, 256]))
def test_predecessors_match_a_byte_by_byte_replay(lv, extra, alignment):
    plan = schedule(lv, minimum_budget(lv, alignment=alignment) + extra, cost_model=UNIT_COSTS, calls=1,
                    alignment=alignment)
    assert reuse_predecessors(plan) == brute_force(plan)
