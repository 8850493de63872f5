"""Compiled equals eager, bit for bit on CPU, on eight real architectures with streamed weights,
and the process grows by no more than the budget."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, minimum_budget
from vramfx.measure import PeakMemory, release_freed_memory


@pytest.fixture(scope="module")
def export_state_paid() -> None:
    """torch.export's one-time process state (~90 MB on a process's first compile) is not the
    model's: an earlier compile of another model pays it."""
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_compiled_equals_eager_while_streaming(arch_name, tmp_path, export_state_paid):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)

    weights = vramfx.DiskMap(tmp_path)
    empty = build_empty(arch)
    weight_bytes = sum(t.numel() * t.element_size() for t in eager.state_dict().values())
    release_freed_memory()
    # RssAnon from before the first compile of this model through its calls, at the minimum
    # budget (the probe that finds the minimum, a compile that fails, is counted too).
    with PeakMemory("cpu") as peak:
        minimum = minimum_budget(empty, weights, inputs)
        fast = vramfx.compile(empty, budget=minimum, weights=weights, device="cpu")
        assert_same_output(expected, fast(**inputs))
        assert_same_output(expected, fast(**inputs))
    assert peak.growth_bytes <= minimum, (peak.growth_bytes, minimum)
    assert 0 < fast.plan.streamed_bytes and fast.plan.peak_bytes <= minimum
    budget = minimum + weight_bytes // 3
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu")
    assert_same_output(expected, fast(**inputs))
    assert_same_output(expected, fast(**inputs))
    assert 0 < fast.plan.streamed_bytes and fast.plan.peak_bytes <= budget
