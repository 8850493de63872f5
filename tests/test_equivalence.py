"""Compiled equals eager, bit for bit on CPU, on hypothesis-generated models, dtypes and budgets.

Each example draws a random model (:mod:`random_models`), where its weights come from (real on
the module, a plain state dict, or safetensors behind a DiskMap), a budget between the minimum
vramfx reports and one that holds every weight, a cost model and a number of calls; it compiles
the model and checks three calls — the first, one with other inputs, and the first again —
against eager with ``torch.equal``.

An export costs about a second, so the default run draws a dozen examples; ``pytest -m slow``
(or ``HYPOTHESIS_PROFILE=slow``) draws 500.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from random_models import EVERY_OP, Recipe, RecipeModel, Step, recipes
from strategies import cost_models

import vramfx
from vramfx.plan.costs import CostModel

#: Examples per run: a dozen by default, 500 under the ``slow`` hypothesis profile.
EXAMPLES = 500 if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else 12
SLOW_EXAMPLES = 500
SOURCES = ("module", "state_dict", "diskmap")


def same_bits(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """``torch.equal``, except that NaNs at the same places with the same bits are equal too."""
    if torch.equal(expected, actual):
        return True
    if expected.dtype != actual.dtype or expected.shape != actual.shape or not expected.is_floating_point():
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    return torch.equal(expected.view(as_int), actual.view(as_int))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tied tensor counts once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def minimum_bytes(model: torch.nn.Module, weights: object, example: tuple, **kwargs: object) -> int:
    """The minimum budget vramfx reports when asked for one byte."""
    with pytest.raises(vramfx.BudgetError) as info:
        vramfx.compile(model, budget=1, weights=weights, device="cpu", example_args=example, **kwargs)
    assert info.value.minimum_bytes is not None
    return info.value.minimum_bytes


def check_equivalence(
    recipe: Recipe, source: str, fraction: float, cost_model: CostModel, calls: int, folder: Path
) -> None:
    """Compile ``recipe``'s model at a budget ``fraction`` of the way from minimum to all-fits."""
    torch.manual_seed(recipe.seed)
    eager = RecipeModel(recipe).eval()
    first, other = recipe.inputs(0), recipe.inputs(1)
    with torch.no_grad():
        expected = [eager(*first), eager(*other)]

    weights: object = None
    model = eager
    if source != "module":
        with vramfx.skip_model_initialization():
            model = RecipeModel(recipe).eval()
        if source == "state_dict":
            weights = eager.state_dict()
        else:
            path = folder / "model.safetensors"
            safetensors.torch.save_model(eager, str(path))  # keeps one name of each tied tensor
            weights = vramfx.DiskMap(path)
    options = {"cost_model": cost_model, "calls": calls, "margin_bytes": 0}
    try:
        minimum = minimum_bytes(model, weights, first, **options)
        budget = minimum + int(fraction * weight_bytes(eager))
        fast = vramfx.compile(model, budget=budget, weights=weights, device="cpu", **options)
        for call, (args, want) in enumerate([(first, expected[0]), (other, expected[1]), (first, expected[0])]):
            got = fast(*args)
            assert isinstance(got, tuple) and len(got) == len(want)
            for i, (e, a) in enumerate(zip(want, got)):
                assert same_bits(e, a), f"call {call}, output {i}: compiled differs from eager"
        plan = fast.plan
        assert plan.peak_bytes <= budget
        event(f"source {source}, {recipe.dtype_name}")
        event("streams" if plan.transfers else "all resident")
        for op in {s.op for s in recipe.steps}:
            event(f"op {op}")
        assert len(fast.compiled_graphs) == 1, "the second input has the same signature"
        if fraction == 0 and plan.weight_bytes:
            assert plan.streamed_bytes > 0 or not plan.transfers, "at the minimum budget weights stream"
        fast.release()
    finally:
        if isinstance(weights, vramfx.DiskMap):
            weights.close()


problems = {
    "recipe": recipes(),
    "source": st.sampled_from(SOURCES),
    "fraction": st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    "cost_model": cost_models,
    "calls": st.sampled_from([1, 10]),
}


CPU_COSTS = CostModel.for_device("cpu")
#: Found by this test: a Linear reading a Conv2d's output through a transpose (non-contiguous);
#: torch's matmul takes another path when the weight requires grad, and arena copies did not.
CONV_THEN_LINEAR = Recipe(
    batch=1, height=1, width_px=2, in_width=4, vocab=5, dtype_name="float32",
    steps=(Step("conv", (0,), 4, (1, False)), Step("linear", (1,), 4, False)), outputs=(2,), seed=0,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**problems)
@example(recipe=EVERY_OP, source="diskmap", fraction=0.0, cost_model=CPU_COSTS, calls=1)
@example(recipe=CONV_THEN_LINEAR, source="module", fraction=0.0, cost_model=CPU_COSTS, calls=1)
@example(recipe=dataclasses.replace(EVERY_OP, dtype_name="float16"), source="state_dict", fraction=0.3,
         cost_model=CPU_COSTS, calls=10)
@example(recipe=dataclasses.replace(EVERY_OP, dtype_name="float32"), source="module", fraction=1.0,
         cost_model=CPU_COSTS, calls=10)
def test_compiled_equals_eager_on_random_models(recipe, source, fraction, cost_model, calls):
    with tempfile.TemporaryDirectory() as folder:
        check_equivalence(recipe, source, fraction, cost_model, calls, Path(folder))


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**problems)
def test_compiled_equals_eager_on_many_random_models(recipe, source, fraction, cost_model, calls):
    with tempfile.TemporaryDirectory() as folder:
        check_equivalence(recipe, source, fraction, cost_model, calls, Path(folder))
