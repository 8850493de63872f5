"""The persistent plan cache: a second compile reads its plan instead of scheduling, equal to
eager; anything a plan depends on changes the key; bad entries are misses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vramfx
import vramfx.plan_cache as plan_cache
from vramfx.plan import reads
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.cli import main
from vramfx.plan.costs import CostModel


def _entries(folder):
    return sorted((folder / "plans").glob("*.pkl")) if (folder / "plans").exists() else []


@pytest.fixture
def schedules(monkeypatch):
    """How many times the scheduler ran."""
    count = [0]
    original = plan_cache.schedule

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(plan_cache, "schedule", counted)
    monkeypatch.setattr(reads, "schedule", counted)  # CPU plans schedule through the choice of reads
    return count


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    arch = ARCHS["llama"]
    eager = build_saved(arch, folder)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weight_bytes = sum(t.numel() * t.element_size() for t in eager.state_dict().values())
    return folder, inputs, expected, weight_bytes


def _compile(saved, budget, **kwargs):
    folder, inputs, _, _ = saved
    return vramfx.compile(build_empty(ARCHS["llama"]), budget=budget, weights=vramfx.DiskMap(folder), device="cpu",
                          example_kwargs=inputs, **kwargs)


def test_a_second_compile_reads_the_plan_and_equals_eager(saved, capture_cache_dir, schedules, monkeypatch):
    _, inputs, expected, weight_bytes = saved
    budget = weight_bytes + 2**27
    first = _compile(saved, budget)
    assert schedules[0] == 1 and len(_entries(capture_cache_dir)) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the scheduler ran although the plan was cached")

    monkeypatch.setattr(plan_cache, "schedule", refuse)
    second = _compile(saved, budget)
    assert second.plan == first.plan
    assert_same_output(expected, first(**inputs))
    assert_same_output(expected, second(**inputs))


def test_budget_cost_model_and_options_miss(saved, capture_cache_dir, schedules):
    _, inputs, expected, weight_bytes = saved
    budget = weight_bytes + 2**27
    _compile(saved, budget)
    _compile(saved, budget + 2**20)
    slower = dataclasses.replace(CostModel.for_device("cpu"), link_bytes_per_s=1e8)
    fast = _compile(saved, budget, cost_model=slower)
    _compile(saved, budget, calls=3)
    _compile(saved, budget, margin_bytes=2**20)
    assert schedules[0] == 5 and len(_entries(capture_cache_dir)) == 5
    assert_same_output(expected, fast(**inputs))
    _compile(saved, budget, cost_model=slower)  # each of them is read back
    assert schedules[0] == 5


def test_the_key_covers_the_liveness_and_every_setting(saved):
    from vramfx.capture import capture
    from vramfx.plan.liveness import build_liveness

    _, inputs, _, _ = saved
    liveness = build_liveness(capture(build_empty(ARCHS["llama"]), (), inputs))
    settings = dict(cost_model=CostModel.for_device("cpu"), calls=10, alignment=64, margin_bytes=0, in_place=())
    base = plan_cache.plan_key(liveness, 2**30, **settings)
    assert plan_cache.plan_key(liveness, 2**30, **settings) == base
    stored_lower = dataclasses.replace(liveness, weights=(dataclasses.replace(liveness.weights[0], dtype="bfloat16"),
                                                          *liveness.weights[1:]))
    changed = [
        plan_cache.plan_key(liveness, 2**30 + 1, **settings),
        plan_cache.plan_key(stored_lower, 2**30, **settings),
        plan_cache.plan_key(liveness, 2**30, **{**settings, "cost_model": CostModel.for_device("cuda")}),
        plan_cache.plan_key(liveness, 2**30, **{**settings, "calls": 11}),
        plan_cache.plan_key(liveness, 2**30, **{**settings, "alignment": 256}),
        plan_cache.plan_key(liveness, 2**30, **{**settings, "margin_bytes": 1}),
        plan_cache.plan_key(liveness, 2**30, **{**settings, "in_place": (liveness.weights[0].name,)}),
    ]
    assert len(set(changed) | {base}) == len(changed) + 1


@pytest.mark.parametrize("switch", ["argument", "environment"])
def test_the_plan_cache_can_be_turned_off(switch, saved, capture_cache_dir, schedules, monkeypatch):
    budget = saved[3] + 2**27
    if switch == "environment":
        monkeypatch.setenv("VRAMFX_CACHE", "0")
    kwargs = {"cache": False} if switch == "argument" else {}
    _compile(saved, budget, **kwargs)
    _compile(saved, budget, **kwargs)
    assert schedules[0] == 2 and not _entries(capture_cache_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key"])
def test_a_bad_plan_entry_is_ignored_and_replaced(damage, saved, capture_cache_dir, schedules, caplog):
    budget = saved[3] + 2**27
    first = _compile(saved, budget)
    (entry,) = _entries(capture_cache_dir)
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    else:
        _compile(saved, budget + 2**20)
        (other,) = [e for e in _entries(capture_cache_dir) if e != entry]
        entry.write_bytes(other.read_bytes())
    with caplog.at_level("DEBUG", logger="vramfx.plan_cache"):
        again = _compile(saved, budget)
    assert "ignoring unreadable plan cache entry" in caplog.text
    assert again.plan == first.plan
    assert entry.read_bytes() == data


def test_vramfx_plan_uses_the_plan_cache(capture_cache_dir, schedules, tmp_path, capsys):
    workload = tmp_path / "workload.py"
    workload.write_text(
        "import torch\n"
        "def build():\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))\n"
        "    return model, (torch.ones(2, 64),)\n"
    )
    args = ["plan", f"{workload}:build", "--budget", "64MB", "--device", "cpu", "--format", "json"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert schedules[0] == 1 and len(_entries(capture_cache_dir)) == 1
    assert main([*args, "--no-cache"]) == 0
    assert schedules[0] == 2


def test_what_the_page_cache_holds_is_part_of_the_key(saved, capture_cache_dir, schedules):
    from vramfx.plan.reads import PageCacheState

    folder, inputs, expected, weight_bytes = saved
    aligned = vramfx.convert(folder, folder.parent / "aligned", dtype=None)  # weights it can use in place
    saved = (aligned, *saved[1:])
    budget = weight_bytes + 2**27
    warm = _compile(saved, budget)
    assert warm.plan.in_place
    with vramfx.DiskMap(aligned) as weights:
        names = list(weights)
    cold = PageCacheState(cached=dict.fromkeys(names, 0.0), available_bytes=weight_bytes // 8)
    before = schedules[0]
    # Bigger than the memory left: faults on every call would cost, so nothing in place; not the warm plan read back.
    copied = _compile(saved, budget, page_cache=cold)
    assert schedules[0] > before and copied.plan.in_place == () and copied.plan != warm.plan
    assert _compile(saved, budget, page_cache=cold).plan == copied.plan  # and itself read back
    assert_same_output(expected, copied(**inputs))
