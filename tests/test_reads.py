"""How CPU weights are read, chosen by predicted time: in place when the page cache holds them
(and can keep them), O_DIRECT or a copy when it cannot, a copy when a weight is not aligned; a
user's in_place=False or bypass_page_cache=True forces the way. Page-cache state is an input."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.plan.check import check_plan
from vramfx.plan.costs import CostModel
from vramfx.plan.in_place import without_in_place
from vramfx.plan.reads import PageCacheState, schedule_reads
from vramfx.plan.types import Liveness, WeightLife

MiB = 2**20
COST = CostModel(compute_flops_per_s=1e10, memory_bytes_per_s=1e10, link_bytes_per_s=4e9, link_latency_s=1e-5,
                 node_overhead_s=1e-5, copy_interference=1.0, disk_bytes_per_s=1e9)


def _liveness(n: int = 8, nbytes: int = 4 * MiB, flops: float = 1e8) -> Liveness:
    """``n`` weights, weight ``i`` used at position ``i`` only; ``flops`` per node (10 ms here)."""
    weights = tuple(WeightLife(f"w{i}", nbytes, (i,), ((i, i + 1),)) for i in range(n))
    return Liveness(num_positions=n, weights=weights, activation_bytes=(MiB,) * n, flops=(flops,) * n,
                    memory_bytes=(MiB,) * n)


def _plan(page_cache: PageCacheState, *, mappable=None, ways=("in place", "copy", "direct"), budget=12 * MiB, live=None):
    live = live or _liveness()
    mappable = {w.name for w in live.weights} if mappable is None else mappable
    plan = schedule_reads(live, budget, cost_model=COST, calls=10, alignment=64, margin_bytes=0, mappable=mappable,
                          page_cache=page_cache, ways=ways)
    check_plan(plan, without_in_place(live, plan.in_place))  # faults priced as stall keep the sums whole
    return plan


def test_cached_weights_are_used_in_place():
    plan = _plan(PageCacheState())
    assert set(plan.in_place) == {f"w{i}" for i in range(8)} and plan.reads == "copy"
    assert plan.streamed_bytes == 0


def test_cold_weights_that_fit_in_memory_are_still_used_in_place_after_one_read():
    state = PageCacheState(cached={f"w{i}": 0.0 for i in range(8)}, available_bytes=10**9)
    plan = _plan(state)
    assert len(plan.in_place) == 8
    # The first call reads the 32 MiB by page faults at 1 GB/s; later ones find them cached.
    assert plan.predicted.first_call_seconds - plan.predicted.seconds_per_call == pytest.approx(32 * MiB / 1e9, rel=0.05)


def test_weights_bigger_than_available_memory_are_read_with_o_direct():
    state = PageCacheState(cached={f"w{i}": 0.0 for i in range(8)}, available_bytes=4 * MiB)
    plan = _plan(state)
    # In place would fault most pages in on every call, serially; O_DIRECT overlaps the disk with compute.
    assert plan.in_place == () and plan.reads == "direct"
    in_place_only = _plan(state, ways=("in place", "copy"))
    assert plan.predicted.seconds_per_call < in_place_only.predicted.seconds_per_call


def test_misaligned_weights_are_copied():
    plan = _plan(PageCacheState(), mappable={"w0", "w1"})
    assert set(plan.in_place) == {"w0", "w1"} and plan.reads == "copy"
    assert plan.streamed_bytes > 0


def test_the_user_forces_the_way():
    state = PageCacheState()
    assert _plan(state, ways=("copy", "direct")).in_place == ()
    assert _plan(state, ways=("copy", "direct")).reads == "copy"  # cached: O_DIRECT would reread the disk
    forced = _plan(state, ways=("direct",))
    assert forced.in_place == () and forced.reads == "direct"
    with pytest.raises(ValueError, match="ways"):
        _plan(state, ways=("in place",))


def test_plans_are_reproducible_for_a_given_state():
    state = PageCacheState(cached={"w0": 0.5, "w3": 0.0}, available_bytes=8 * MiB)
    assert _plan(state) == _plan(state)


def test_page_cache_state_checks_its_figures():
    with pytest.raises(ValueError, match="cached fraction"):
        PageCacheState(cached={"w": 1.5})
    with pytest.raises(ValueError, match="available_bytes"):
        PageCacheState(available_bytes=-1)


def test_compile_measures_the_page_cache_and_takes_a_stated_one(tmp_path):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path / "saved")
    aligned = vramfx.convert(tmp_path / "saved", tmp_path / "aligned", dtype=None)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(aligned)
    names = list(weights)
    cached = weights.cached_fractions()
    assert cached is None or set(cached) == set(names)
    fast = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs,
                          cost_model=COST)
    assert fast.plan.in_place and fast.plan.reads == "copy"  # just written: in the page cache
    cold = PageCacheState(cached=dict.fromkeys(names, 0.0), available_bytes=weights.nbytes // 8)
    direct = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs,
                            cost_model=COST, page_cache=cold)
    assert direct.plan.in_place == () and direct.plan.reads == "direct"
    assert_same_output(expected, direct(**inputs))
    assert_same_output(expected, fast(**inputs))
    with pytest.raises(TypeError, match="page_cache"):
        vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", page_cache={"a": 1.0})
