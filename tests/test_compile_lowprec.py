"""compile with low-precision storage: exactly the eager model whose weights went through the storage
dtype and back, under a budget that shrinks with the storage."""

from __future__ import annotations

import gc

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, minimum_budget
from vramfx.capture import capture
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.plan.costs import CostModel
from vramfx.plan.liveness import build_liveness
from vramfx.plan.schedule import minimum_budget as plan_minimum_budget
from vramfx.plan.schedule import planned_casts, schedule
from vramfx.precision import keep_items, kept_names, precision_from_arguments, storage_dtypes

FP8 = torch.float8_e4m3fn


def reference(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype, keep="auto") -> torch.nn.Module:
    """``model`` in ``compute``, each weight outside the keep list rounded through ``storage``."""
    kept = kept_names(model, keep_items(keep))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in kept and p.dtype.is_floating_point:
                p.data = p.data.to(storage).to(compute)
    return model.to(compute)


def in_dtype(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("arch_name", ["flux", "llama"])
@pytest.mark.parametrize(
    ("storage", "compute"),
    [(FP8, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["e4m3-bf16", "bf16-fp32", "fp16-fp32"],
)
def test_compiled_equals_eager_through_the_storage_dtype(arch_name, storage, compute, tmp_path):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = in_dtype(arch.inputs(), compute)
    with torch.no_grad():
        expected = reference(eager, storage, compute)(**inputs)

    weights = vramfx.DiskMap(tmp_path)  # float32 on disk: converted once into host memory
    empty = build_empty(arch)
    options = {"storage_dtype": storage, "compute_dtype": compute}
    minimum = minimum_budget(empty, weights, inputs, **options)
    at_minimum = vramfx.compile(empty, budget=minimum, weights=weights, device="cpu", **options)
    assert_same_output(expected, at_minimum(**inputs))
    stored_bytes = at_minimum.plan.weight_bytes
    budget = minimum + stored_bytes // 3
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", **options)
    assert fast.dtype == compute
    assert_same_output(expected, fast(**inputs))
    assert_same_output(expected, fast(**inputs))
    plan = fast.plan
    assert plan.peak_bytes <= budget and plan.streamed_bytes > 0
    casts = [s for s in plan.steps if s.op == "cast"]
    assert {s.transfer == -1 for s in casts} == {True, False}, "resident and streamed weights are both cast"
    low = [w for w in plan.weights if w.compute_dtype is not None]
    assert low and all(w.dtype == str(storage).removeprefix("torch.") for w in low)
    assert stored_bytes < weights.nbytes, "the plan moves storage-dtype bytes, fewer than the fp32 file's"


@pytest.mark.parametrize("arch_name", ["flux", "llama"])
def test_a_pre_converted_checkpoint_is_read_as_it_is_and_gives_the_same_result(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path / "fp32")
    inputs = in_dtype(arch.inputs(), torch.bfloat16)
    with torch.no_grad():
        expected = reference(eager, FP8, torch.bfloat16)(**inputs)
    empty = build_empty(arch)
    fp8 = vramfx.DiskMap(vramfx.convert(tmp_path / "fp32", tmp_path / "fp8", dtype=FP8, model=empty))
    options = {"storage_dtype": FP8, "compute_dtype": torch.bfloat16}
    minimum = minimum_budget(empty, fp8, inputs, **options)
    fast = vramfx.compile(empty, budget=minimum, weights=fp8, device="cpu", **options)
    assert_same_output(expected, fast(**inputs))
    graph = fast.compiled_graphs[0]
    low = {n for n, r in graph.engine.refs.items() if r.dtype == FP8}
    assert low and all(graph.engine.refs[n].source is fp8 for n in low), "fp8 bytes come straight from the file"


def llama(layers: int, hidden: int, vocab: int):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8)
    with vramfx.skip_model_initialization():
        return LlamaModel(config).eval()


def liveness_of(model: torch.nn.Module, call: dict, storage: torch.dtype | None):
    """What compile plans from: the model captured on meta, each weight sized in its storage dtype."""
    captured = capture(model, (), call)
    precision = precision_from_arguments(storage, None, None)
    stored = storage_dtypes(model, captured.weights, precision) if precision else None
    return build_liveness(captured, storage_dtypes=stored)


def quarter_budget(budget32: int, fp32, fp8, fixed: int) -> int:
    """A quarter of the weights' share of an fp32 budget, plus activations, ``fixed`` and the
    upcast region fp8 storage adds."""
    upcast = planned_casts(fp8)[1]
    return (budget32 - fp32.activation_peak_bytes - fixed) // 4 + fp32.activation_peak_bytes + fixed + upcast


def test_fp8_storage_needs_a_quarter_of_the_fp32_weight_budget_plus_the_upcast_buffers():
    call = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "use_cache": False}
    model = llama(layers=4, hidden=256, vocab=1024)
    fp32, fp8 = liveness_of(model, call, None), liveness_of(model, call, FP8)
    assert fp8.activation_bytes == fp32.activation_bytes
    assert fp8.weight_bytes < fp32.weight_bytes / 3.9
    upcast = planned_casts(fp8)[1]
    largest = max(w.compute_nbytes for w in fp8.weights)
    assert largest <= upcast <= 2 * largest, "about one weight in the compute dtype at a time"
    costs = CostModel.for_device("cpu")
    for extra in (0, fp32.weight_bytes // 4, fp32.weight_bytes // 2):
        budget32 = plan_minimum_budget(fp32) + extra
        budget8 = quarter_budget(budget32, fp32, fp8, fp32.workspace_bytes) + 64 * len(fp8.weights)
        plan = schedule(fp8, budget8, cost_model=costs, calls=10)  # raises BudgetError if not
        assert plan.peak_bytes <= budget8 and plan.upcast_bytes == upcast


def test_fp8_budget_is_kept_measured_as_rss_anon(tmp_path):
    """A 58 MB (fp32) Llama stored as fp8 runs in a quarter of an fp32 streaming budget's weight
    share plus the upcast buffers, measured as RssAnon over its calls."""
    from vramfx.compiler import DEFAULT_MARGIN_BYTES, compile_margin_bytes

    torch.manual_seed(0)
    call = {"input_ids": torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(0)),
            "use_cache": False}
    empty = llama(layers=4, hidden=512, vocab=2048)
    eager = type(empty)(empty.config).eval()
    eager.save_pretrained(tmp_path / "fp32")
    with torch.no_grad():
        expected = reference(eager, FP8, torch.float32, keep=None)(**call).last_hidden_state
    del eager
    gc.collect()
    fp8 = vramfx.DiskMap(vramfx.convert(tmp_path / "fp32", tmp_path / "fp8", dtype=FP8, keep_in_compute_dtype=None))

    fp32_live, fp8_live = liveness_of(empty, call, None), liveness_of(empty, call, FP8)
    # compile's margin also counts the host memory its graph holds outside the plan.
    margin = compile_margin_bytes(capture(empty, (), call), fp8_live, torch.device("cpu"), DEFAULT_MARGIN_BYTES["cpu"])
    fixed = fp32_live.workspace_bytes + margin
    budget32 = plan_minimum_budget(fp32_live, margin_bytes=margin) + fp32_live.weight_bytes // 4
    budget8 = quarter_budget(budget32, fp32_live, fp8_live, fixed) + 64 * len(fp8_live.weights)
    # Streamed, not used in place from the (aligned) converted file: the budget is what is tested.
    fast = vramfx.compile(empty, budget=budget8, weights=fp8, device="cpu", example_kwargs=call, calls=3,
                          storage_dtype=FP8, keep_in_compute_dtype=None, in_place=False)
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        outputs = [fast(**call).last_hidden_state for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    assert fast.plan.streamed_bytes > 0 and fast.plan.peak_bytes <= budget8
    assert peak.growth_bytes <= budget8, (peak.growth_bytes, budget8)


@pytest.mark.parametrize("source", ["fp32 file", "fp8 file"])
def test_the_cuda_engine_runs_casts_on_the_compute_side_with_the_same_result(source, tmp_path):
    from fake_streams import ThreadStreams
    from test_runtime_cuda import small_pinned, use_cuda_engine

    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path / "fp32")
    inputs = in_dtype(arch.inputs(), torch.bfloat16)
    with torch.no_grad():
        expected = reference(eager, FP8, torch.bfloat16)(**inputs)
    empty = build_empty(arch)
    folder = tmp_path / "fp32"
    if source == "fp8 file":
        folder = vramfx.convert(folder, tmp_path / "fp8", dtype=FP8, model=empty)
    weights = vramfx.DiskMap(folder)
    # Planned on CPU as a CUDA plan would be: every weight moves (none is used in place).
    options = {"storage_dtype": FP8, "compute_dtype": torch.bfloat16, "in_place": False}
    budget = minimum_budget(empty, weights, inputs, **options) + 16 * 2**10
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=inputs, **options)
    use_cuda_engine(fast, ThreadStreams(copy_delay_s=0.0005), pinned=small_pinned())
    assert fast.plan.casts and fast.plan.transfers
    for _ in range(2):
        assert_same_output(expected, fast(**inputs))
