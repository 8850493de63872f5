"""enable_vram_management and the wrappers: matching, checks before any change, low-precision storage."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import vramfx
from tiny_models import ARCHS, build_empty, build_saved
from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management, offload, swap_stats

DISK = dict(offload_dtype="disk", offload_device="disk", computation_device="cpu")


def llama_map() -> dict[type, type]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return {torch.nn.Linear: AutoWrappedLinear, LlamaRMSNorm: AutoWrappedModule, torch.nn.Embedding: AutoWrappedModule}


def wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (AutoWrappedLinear, AutoWrappedModule))]


def test_the_map_is_matched_in_order():
    class Sub(torch.nn.Linear):
        pass

    def wrapped(module_map):
        model = torch.nn.Sequential(Sub(4, 4), torch.nn.Linear(4, 4))
        enable_vram_management(model, module_map, dict(computation_device="cpu"))
        return [type(m) for m in model]

    assert wrapped({Sub: AutoWrappedModule, torch.nn.Linear: AutoWrappedLinear}) == [AutoWrappedModule, AutoWrappedLinear]
    assert wrapped({torch.nn.Linear: AutoWrappedLinear, Sub: AutoWrappedModule}) == [AutoWrappedLinear, AutoWrappedLinear]


def test_a_matched_module_is_wrapped_whole(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path)
    model = enable_vram_management(build_empty(arch), {LlamaDecoderLayer: AutoWrappedModule, **llama_map()},
                                   DISK, vram_limit=0, disk_map=vramfx.DiskMap(tmp_path))
    assert all(isinstance(layer, AutoWrappedModule) for layer in model.layers)
    assert not any(isinstance(m, AutoWrappedLinear) for m in model.layers.modules()), "not descended into"
    with torch.no_grad():
        assert torch.equal(eager(**arch.inputs()).last_hidden_state, model(**arch.inputs()).last_hidden_state)
    assert swap_stats(model).order == ("embed_tokens", "layers.0", "layers.1", "norm")


def test_missing_and_mismatched_weights_are_all_listed_and_nothing_changes(tmp_path):
    arch = ARCHS["llama"]
    state = build_saved(arch, tmp_path / "full").state_dict()
    del state["layers.0.mlp.up_proj.weight"], state["norm.weight"]
    state["layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "partial.safetensors")
    model = build_empty(arch)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(vramfx.WeightsError, match=r"2 parameter\(s\) of LlamaModel have no stored weight: "
                                                  r"layers.0.mlp.up_proj.weight, norm.weight.* 1 stored weight\(s\) "
                                                  r"differ in shape .*down_proj.weight: stored \(3, 3\)"):
        enable_vram_management(model, llama_map(), DISK, disk_map=vramfx.DiskMap(tmp_path / "partial.safetensors"))
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert "forward" not in model.__dict__
    enable_vram_management(model, llama_map(), DISK, disk_map=vramfx.DiskMap(tmp_path / "full"))  # still possible


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(module_map={}), "module_map must be a non-empty dict"),
        (dict(module_map={torch.nn.Linear: torch.nn.Identity}), r"module_map\[Linear\] = .*use AutoWrappedModule"),
        (dict(module_map={torch.nn.LayerNorm: AutoWrappedLinear}), "wraps nn.Linear only"),
        (dict(module_map={"Linear": AutoWrappedLinear}), "is not an nn.Module subclass"),
        (dict(disk_map=None), 'places weights on "disk", but no disk_map was given'),
        (dict(vram_config={"compute_device": "cpu"}), r"unknown key\(s\) compute_device"),
        (dict(vram_limit="lots"), "vram_limit: budget='lots'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs, match, tmp_path):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    model = build_empty(arch)
    arguments = {"module_map": llama_map(), "vram_config": DISK, "disk_map": vramfx.DiskMap(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=match):
        enable_vram_management(model, **arguments)
    assert not wrappers(model)


def test_enabling_twice_and_switching_an_unmanaged_model_are_errors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear}, dict(computation_device="cpu"))
    with pytest.raises(ValueError, match="already has vram management enabled"):
        enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear}, dict(computation_device="cpu"))
    with pytest.raises(ValueError, match="call enable_vram_management first"):
        offload(torch.nn.Linear(2, 2))


def test_wrappers_work_on_their_own_and_keep_their_names(tmp_path):
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(8, 4), torch.nn.LayerNorm(8)
    save_file({"head.weight": linear.weight.detach(), "head.bias": linear.bias.detach()}, tmp_path / "head.safetensors")
    x = torch.randn(2, 8)
    with vramfx.skip_model_initialization():
        empty = torch.nn.Linear(8, 4)
    wrapped = AutoWrappedLinear(empty, name="head", disk_map=vramfx.DiskMap(tmp_path / "head.safetensors"),
                                vram_limit=0, **DISK)
    assert isinstance(wrapped, torch.nn.Linear) and set(wrapped.state_dict()) == {"weight", "bias"}
    wrapped_norm = AutoWrappedModule(copy.deepcopy(norm), computation_device="cpu", offload_dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(wrapped(x), linear(x))
            assert torch.equal(wrapped_norm(x), norm(x)), "float64 at rest computes in float32"
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        AutoWrappedLinear(norm, computation_device="cpu")


def test_float8_storage_is_upcast_on_the_compute_device_and_the_model_sees_the_compute_dtype(tmp_path):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path)
    reference = copy.deepcopy(eager)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
        expected = reference(**arch.inputs()).last_hidden_state
    model = enable_vram_management(copy.deepcopy(reference), llama_map(),
                                   dict(offload_dtype=torch.float8_e4m3fn, offload_device="cpu",
                                        computation_dtype=torch.float32, computation_device="cpu"),
                                   vram_limit="100KiB")
    assert model.dtype == torch.float32 and model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(expected, model(**arch.inputs()).last_hidden_state)
    stats = swap_stats(model)
    assert stats.fetched_bytes == 0 and stats.cast_bytes > 0, "host memory is the compute device: only casts"


def test_unmatched_parameters_and_buffers_are_put_on_the_device_once(tmp_path):
    arch = ARCHS["wan"]
    build_saved(arch, tmp_path)
    model = enable_vram_management(build_empty(arch), {torch.nn.Linear: AutoWrappedLinear}, DISK,
                                   vram_limit=0, disk_map=vramfx.DiskMap(tmp_path))
    assert not model.scale_shift_table.is_meta and not model.patch_embedding.weight.is_meta
    assert not model.blocks[0].norm2.weight.is_meta, "a norm left unwrapped is loaded"
    assert model.blocks[0].attn1.to_q.weight.is_meta, "a wrapped Linear stays on disk"


def test_a_map_that_matches_nothing_under_a_limit_runs_the_model_as_it_is(tmp_path):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path)
    with torch.no_grad():
        expected = eager(**arch.inputs()).last_hidden_state
    model = enable_vram_management(build_empty(arch), {torch.nn.Conv3d: AutoWrappedModule}, DISK,
                                   vram_limit="1MiB", disk_map=vramfx.DiskMap(tmp_path))
    assert not wrappers(model)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(expected, model(**arch.inputs()).last_hidden_state)
