"""Low-precision storage on the module-level paths: the layer-swap fields ``offload_dtype`` /
``computation_dtype``, and compile's ``storage_dtype`` / ``compute_dtype`` on its fallback and in
``generate``. Each equals, exactly, eager on weights that went through the storage dtype and back,
as compiled graphs do, and keeps its limit."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from test_compile_lowprec import FP8, in_dtype, reference
from test_swap_fallback import vramfx_warnings
from test_swap_models import module_map

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.precision import precision_from_arguments
from vramfx.swap.fallback import ModulePath
from vramfx.swap import enable_vram_management, swap_stats

PAIRS = pytest.mark.parametrize(
    ("storage", "compute"),
    [(FP8, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["e4m3-bf16", "bf16-fp32", "fp16-fp32"],
)


def wrapped_rounded(model: torch.nn.Module, types: tuple[type, ...], storage: torch.dtype,
                    compute: torch.dtype) -> torch.nn.Module:
    """A copy whose parameters are in ``compute``, those inside modules of ``types`` rounded through
    ``storage`` first. Buffers keep their dtypes: the layer-swap path moves them as they are
    (Llama's rotary frequencies stay float32)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, types):
                for p in module.parameters(recurse=False):
                    p.copy_(p.to(storage).to(p.dtype))
        for p in out.parameters():
            p.data = p.data.to(compute)
    return out


def stored_bytes(model: torch.nn.Module, types: tuple[type, ...], dtype: torch.dtype) -> int:
    """Bytes the parameters of modules of ``types`` take in ``dtype``."""
    return sum(p.numel() * dtype.itemsize for m in model.modules() if isinstance(m, types)
               for p in m.parameters(recurse=False))


@PAIRS
@pytest.mark.parametrize("arch_name", ["flux", "llama"])
def test_layer_swap_from_an_fp32_file_rounds_through_the_offload_dtype(arch_name, storage, compute, tmp_path):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = in_dtype(arch.inputs(), compute)
    types = tuple(module_map(arch_name))
    with torch.no_grad():
        expected = wrapped_rounded(eager, types, storage, compute)(**inputs)

    low = stored_bytes(eager, types, storage)
    # The stored bytes: too few to keep every module with its upcast, so some stream. On the CPU
    # the limit also covers reading the fp32 file (staging) and rounding it.
    limit = low
    model = enable_vram_management(
        build_empty(arch), module_map(arch_name),
        dict(offload_device="disk", offload_dtype=storage, computation_dtype=compute, computation_device="cpu"),
        vram_limit=f"{limit}B", disk_map=vramfx.DiskMap(tmp_path),
    )
    with torch.no_grad():
        for _ in range(3):
            assert_same_output(expected, model(**inputs))
    stats = swap_stats(model)
    assert stats.held_peak_bytes <= limit
    assert 0 < stats.resident_bytes and stats.fetched_bytes > 0 and stats.prefetched > 0
    assert stats.upcast_bytes > 0 and stats.cast_bytes > 0, "each call casts up, in the planned region"
    assert stats.fetched_bytes <= low, "what streams crosses in the storage dtype"


def test_an_fp8_checkpoint_streamed_from_disk_holds_the_limit_measured_as_rss_anon(tmp_path):
    """A Llama of 55 M parameters pre-converted to fp8 with ``vramfx.convert``, streamed from disk
    at a third of its fp8 bytes and computed in bf16: RssAnon grows by at most the limit."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = LlamaModel(config).eval()
    eager.save_pretrained(tmp_path / "fp32", max_shard_size="100MB")
    types = tuple(module_map("llama"))
    with torch.no_grad():
        expected = wrapped_rounded(eager, types, FP8, torch.bfloat16)(input_ids=ids, use_cache=False).last_hidden_state
    del eager
    fp8 = vramfx.convert(tmp_path / "fp32", tmp_path / "fp8", dtype=FP8, keep_in_compute_dtype=None)
    release_freed_memory()

    with vramfx.skip_model_initialization():
        model = LlamaModel(config).eval()
    fp8_bytes = sum(p.numel() for p in model.parameters())
    limit = fp8_bytes // 3
    with PeakMemory("cpu") as peak, torch.no_grad():
        enable_vram_management(model, module_map("llama"),
                               dict(offload_device="disk", offload_dtype="disk",
                                    computation_dtype=torch.bfloat16, computation_device="cpu"),
                               vram_limit=f"{limit}B", disk_map=vramfx.DiskMap(fp8))
        outputs = [model(input_ids=ids, use_cache=False).last_hidden_state for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    stats = swap_stats(model)
    assert stats.held_peak_bytes <= limit and stats.cast_bytes > 0 and stats.upcast_bytes > 0
    assert stats.fetched_bytes > fp8_bytes // 2, "most weights stream, as fp8 bytes"
    # Stated margin: activations of a 32-token call, allocator rounding, Python objects.
    margin = 24 * 2**20
    assert peak.growth_bytes <= limit + margin, (peak.growth_bytes, limit)


class DeepBranches(torch.nn.Module):
    """Many layers whose order a tensor's value picks: export cannot capture it, and the weights
    are large against the activations the first call measures in RssAnon (allocator state too)."""

    def __init__(self, width: int = 1024, depth: int = 16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        h = self.layers[0](x)
        rest = self.layers[1:] if h.sum() > 0 else self.layers[:0:-1]
        for layer in rest:
            h = torch.tanh(layer(h))
        return h


@pytest.mark.parametrize(("storage", "compute"), [(FP8, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["e4m3-bf16", "bf16-fp32"])
def test_the_fallback_stores_and_computes_as_compiled_graphs_do(storage, compute, tmp_path):
    torch.manual_seed(0)
    width, depth = 1024, 16
    eager = DeepBranches(width, depth).eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        empty = DeepBranches(width, depth).eval()
    inputs = [torch.randn(4, width, generator=torch.Generator().manual_seed(i)).to(compute) for i in range(6)]
    with torch.no_grad():
        rounded = reference(copy.deepcopy(eager), storage, compute)
        expected = [rounded(x) for x in inputs]
        branch = [bool(rounded.layers[0](x).sum() > 0) for x in inputs]
    assert any(branch) and not all(branch), "the inputs take both branches"

    margin = 2**20
    # 8 MiB for what the first call measures as activations, and two of the largest modules
    # stored and cast: far below every module kept with its casts (16 of them stored).
    largest = width * width * (storage.itemsize + compute.itemsize)
    budget = margin + 8 * 2**20 + 2 * largest
    assert budget - margin < depth * width * width * storage.itemsize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = vramfx.compile(empty, budget=budget, weights=tmp_path, device="cpu", margin_bytes=margin,
                              storage_dtype=storage, compute_dtype=compute)
        outputs = [fast(x) for x in inputs + inputs]
    assert len(vramfx_warnings(caught)) == 1, "one fallback warning"
    for want, got in zip(expected + expected, outputs):
        assert_same_output(want, got)
    stats = fast.module_path.stats
    assert stats.held_peak_bytes <= budget - margin and stats.cast_bytes > 0 and stats.fetched_bytes > 0
    assert all(p.is_meta for p in empty.parameters()), "the model is left with its meta parameters"


def larger_causal_lm() -> torch.nn.Module:
    """A Llama whose bf16 weights (17 MB) are large against the activations a call measures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0))


def test_generate_with_low_precision_storage_gives_the_rounded_models_tokens(tmp_path):
    torch.manual_seed(0)
    eager = larger_causal_lm().eval()
    eager.save_pretrained(tmp_path)
    with vramfx.skip_model_initialization():
        empty = larger_causal_lm().eval()
    ids = torch.randint(3, 2048, (2, 6), generator=torch.Generator().manual_seed(0))
    rounded = reference(copy.deepcopy(eager), torch.bfloat16, torch.float32)
    expected = rounded.generate(ids, max_new_tokens=6, do_sample=False)

    margin = 2**20
    budget = margin + 8 * 2**20 + sum(p.numel() * 2 for p in eager.parameters()) // 2
    fast = vramfx.compile(empty, budget=budget, weights=vramfx.DiskMap(tmp_path), device="cpu",
                          margin_bytes=margin, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    first = fast.generate(ids, max_new_tokens=6, do_sample=False)
    second = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, first) and torch.equal(expected, second)
    # On captured graphs (a static cache), stored and computed as compile's graphs are.
    assert fast.module_path is None and len(fast.plan.casts) > 0
    assert fast.plan.streamed_bytes > 0 and fast.plan.peak_bytes <= budget
    assert all(p.is_meta for p in empty.parameters())


@pytest.mark.parametrize("arch_name", ["flux", "llama"])
def test_the_module_path_stores_real_architectures_as_compile_does(arch_name, tmp_path):
    """compile's fallback path on its own, on real architectures: the keep list, the storage dtype
    and the compute dtype give exactly what a compiled graph gives."""
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = in_dtype(arch.inputs(), torch.bfloat16)
    with torch.no_grad():
        expected = reference(copy.deepcopy(eager), FP8, torch.bfloat16)(**inputs)
    margin = 2**20
    budget = margin + 16 * 2**20
    path = ModulePath(build_empty(arch), vramfx.DiskMap(tmp_path), device=torch.device("cpu"),
                      budget_bytes=budget, margin_bytes=margin, calls=10,
                      precision=precision_from_arguments(FP8, torch.bfloat16, "auto"))
    for _ in range(2):
        assert_same_output(expected, path(**inputs))
    stats = path.stats
    assert stats.cast_bytes > 0 and stats.held_peak_bytes <= budget - margin
