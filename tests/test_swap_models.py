"""The layer-swap path equals eager on real architectures, offloaded to host memory and to disk."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.measure import PeakMemory
from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management, offload, onload, swap_stats


def module_map(arch_name: str) -> dict[type, type]:
    """Linear layers and norms wrapped; everything else (convolutions, Wan's tables) left on the device."""
    if arch_name == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return {torch.nn.Linear: AutoWrappedLinear, LlamaRMSNorm: AutoWrappedModule, torch.nn.Embedding: AutoWrappedModule}
    from diffusers.models.normalization import RMSNorm

    return {
        torch.nn.Linear: AutoWrappedLinear,
        RMSNorm: AutoWrappedModule,
        torch.nn.RMSNorm: AutoWrappedModule,
        torch.nn.LayerNorm: AutoWrappedModule,
    }


def streamed_from_disk(arch_name: str, folder, vram_limit, **config):
    """The arch saved to ``folder``, its eager output, and an empty twin streaming from there."""
    arch = ARCHS[arch_name]
    eager = build_saved(arch, folder)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    model = enable_vram_management(build_empty(arch), module_map(arch_name),
                                   {"offload_dtype": "disk", "offload_device": "disk", "computation_device": "cpu",
                                    **config},
                                   vram_limit=vram_limit, disk_map=vramfx.DiskMap(folder))
    return model, inputs, expected


def rounded_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy whose floating parameters hold only values ``dtype`` can represent."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return out


def wrapped_bytes(model: torch.nn.Module, types: tuple[type, ...] = (AutoWrappedLinear, AutoWrappedModule)) -> int:
    """Bytes of the parameters of modules of ``types`` in float32 (what the runtime streams)."""
    return sum(p.numel() * 4 for m in model.modules() if isinstance(m, types) for p in m.parameters())


@pytest.mark.parametrize("offload_to", ["cpu", "disk"])
@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_layer_swap_equals_eager_on_two_calls(arch_name, offload_to, tmp_path):
    arch = ARCHS[arch_name]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    if offload_to == "disk":
        reference = eager
        model = build_empty(arch)
        config = dict(offload_dtype="disk", offload_device="disk", computation_device="cpu")
    else:
        # bfloat16 at rest in host memory, float32 compute: host memory is the compute device
        # here, so nothing is copied and each call upcasts the weights there; eager runs on the
        # same bfloat16-representable values.
        reference = rounded_to(eager, torch.bfloat16)
        model = copy.deepcopy(reference)
        config = dict(offload_dtype=torch.bfloat16, offload_device="cpu", computation_device="cpu")
    with torch.no_grad():
        expected = reference(**inputs)

    total = wrapped_bytes(eager, tuple(module_map(arch_name)))
    limit = total // 3
    enable_vram_management(model, module_map(arch_name), config, vram_limit=f"{limit}B",
                           disk_map=vramfx.DiskMap(tmp_path))
    assert wrapped_bytes(model) == total
    wrapped = next(m for m in model.modules() if isinstance(m, AutoWrappedLinear))
    assert wrapped.weight.is_meta and wrapped.weight.dtype == torch.float32, "the model sees the computation dtype"

    with torch.no_grad():
        assert_same_output(expected, model(**inputs))
        first = swap_stats(model)
        assert_same_output(expected, model(**inputs))
        second = swap_stats(model)
    if offload_to == "disk":
        assert first.fetched_bytes == total and first.prefetched == 0, "the first call streams every module synchronously"
        assert 0 < second.resident_bytes < total, "the limit keeps some modules and streams the others"
        assert second.prefetched > 0, "later calls fetch ahead along the recorded order"
    else:
        assert first.fetched_bytes == second.fetched_bytes == 0
        assert second.cast_bytes == total and second.upcast_bytes > 0, "every call casts, in the planned region"
    assert second.held_peak_bytes <= limit


def test_a_zero_limit_streams_everything_every_call(tmp_path):
    model, inputs, expected = streamed_from_disk("llama", tmp_path, 0)
    total = wrapped_bytes(model)
    with torch.no_grad():
        for _ in range(3):
            assert_same_output(expected, model(**inputs))
            stats = swap_stats(model)
            assert stats.resident == () and stats.arena_bytes == 0
            assert stats.fetched_bytes == total, "every wrapped weight is read on every call"
            assert stats.prefetched == 0 and stats.synchronous == len(stats.order)


def test_no_limit_keeps_every_module_after_the_first_call(tmp_path):
    model, inputs, expected = streamed_from_disk("wan", tmp_path, None, offload_dtype=None)
    with torch.no_grad():
        for _ in range(3):
            assert_same_output(expected, model(**inputs))
    stats = swap_stats(model)
    assert stats.fetched_bytes == 0 and stats.resident_bytes >= wrapped_bytes(model)


def test_offload_and_onload_switch_where_weights_rest(tmp_path):
    model, inputs, expected = streamed_from_disk("llama", tmp_path, "200KiB", onload_device="cpu")
    layer = model.layers[0].self_attn.q_proj
    assert layer.weight.is_meta
    onload(model)
    assert not layer.weight.is_meta, "onload reads the weights into host memory"
    with torch.no_grad():
        assert_same_output(expected, model(**inputs))
        assert swap_stats(model).fetched_bytes == 0, "host memory is the compute device: nothing to copy"
    offload(model)
    assert layer.weight.is_meta and swap_stats(model).held_bytes == 0, "offload frees what vramfx held"
    with torch.no_grad():
        assert_same_output(expected, model(**inputs))
    assert swap_stats(model).fetched_bytes > 0


def test_a_bounded_limit_is_kept_measured_as_rss_anon(tmp_path):
    """A 0.24 GB model streamed from disk at a quarter of its weights: RssAnon grows by at most the limit."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = LlamaModel(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    eager.save_pretrained(tmp_path, max_shard_size="100MB")
    with torch.no_grad():
        expected = eager(input_ids=ids, use_cache=False).last_hidden_state
    del eager
    gc.collect()

    with vramfx.skip_model_initialization():
        model = LlamaModel(config).eval()
    limit = weight_bytes // 4
    with PeakMemory("cpu") as peak, torch.no_grad():
        enable_vram_management(model, module_map("llama"),
                               dict(offload_dtype="disk", offload_device="disk", computation_device="cpu"),
                               vram_limit=f"{limit}B", disk_map=vramfx.DiskMap(tmp_path))
        outputs = [model(input_ids=ids, use_cache=False).last_hidden_state for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    stats = swap_stats(model)
    assert stats.held_peak_bytes <= limit
    assert stats.fetched_bytes > weight_bytes // 2, "most weights stream on every call"
    # Stated margin: activations of a 32-token call, allocator rounding, Python objects.
    margin = 24 * 2**20
    assert peak.growth_bytes <= limit + margin, (peak.growth_bytes, limit)


@pytest.mark.cuda
def test_layer_swap_on_cuda_equals_eager_and_keeps_the_limit(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path).to("cuda")
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in arch.inputs().items()}
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    total = wrapped_bytes(eager, tuple(module_map("llama")))
    limit = total // 3
    model = enable_vram_management(build_empty(arch), module_map("llama"),
                                   dict(offload_dtype="disk", offload_device="disk", onload_device="cpu",
                                        computation_device="cuda"),
                                   vram_limit=f"{limit}B", disk_map=vramfx.DiskMap(tmp_path))
    from vramfx.swap import onload

    onload(model)  # host memory: copies run on the side stream from there
    with PeakMemory("cuda") as peak, torch.no_grad():
        outputs = [model(**inputs).last_hidden_state for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    stats = swap_stats(model)
    assert stats.prefetched > 0 and stats.held_peak_bytes <= limit
    # Stated margin: activations of an 8-token call and cuBLAS workspace.
    assert peak.growth_bytes <= limit + 16 * 2**20
