"""Compiled equals eager, bit for bit on CPU, on eight real architectures with streamed weights."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, minimum_budget


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_compiled_equals_eager_while_streaming(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)

    weights = vramfx.DiskMap(tmp_path)
    empty = build_empty(arch)
    minimum = minimum_budget(empty, weights, inputs)
    weight_bytes = sum(t.numel() * t.element_size() for t in eager.state_dict().values())
    for budget in (minimum, minimum + weight_bytes // 3):
        fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu")
        assert_same_output(expected, fast(**inputs))
        assert_same_output(expected, fast(**inputs))
        plan = fast.plan
        assert plan.streamed_bytes > 0
        assert plan.peak_bytes <= budget
