"""PEFT LoRA layers on the layer-swap path: base layers streamed from the checkpoint under their
original names, adapters used on the computation device, outputs equal to eager PEFT."""

from __future__ import annotations

import pytest
import torch

import vramfx
from lora_models import add_lora, assert_equal, delete_adapter, lora_layers, set_active, twins
from test_swap_models import module_map
from vramfx.swap import AutoWrappedLinear, enable_vram_management, swap_stats

pytest.importorskip("peft")

DISK = {"offload_dtype": "disk", "offload_device": "disk", "computation_device": "cpu"}


def swapped(t, arch_name, limit=0.0001):
    return enable_vram_management(t.empty, module_map(arch_name), DISK, vram_limit=limit,
                                  disk_map=vramfx.DiskMap(t.folder))


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_adapters_before_and_after_enable_equal_eager(arch_name, tmp_path):
    t = twins(arch_name, tmp_path)
    base = t.expected()
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    model = swapped(t, arch_name)
    layer = lora_layers(model)[0]
    assert isinstance(layer.base_layer, AutoWrappedLinear)  # streamed from X.weight in the checkpoint
    assert not isinstance(layer.lora_A["a"], AutoWrappedLinear)
    assert_equal(t.expected(), run(model, t.inputs))
    assert swap_stats(model).streamed_bytes > 0

    add_lora([t.eager, model], t.targets, "b", seed=2)
    assert lora_layers(model)[0].lora_A["b"].weight.device.type == "cpu"
    for m in (t.eager, model):
        set_active(m, ["a", "b"], [0.7, -0.4])
    assert_equal(t.expected(), run(model, t.inputs))
    for m in (t.eager, model):  # a hot swap: new values in the same slots
        torch.manual_seed(5)
        for name, p in m.named_parameters():
            if ".lora_A.b." in name:
                p.data.copy_(torch.randn_like(p))
    assert_equal(t.expected(), run(model, t.inputs))
    for m in (t.eager, model):
        delete_adapter(m, "a")
        delete_adapter(m, "b")
    assert_equal(base, run(model, t.inputs))


def test_fused_adapter_on_swapped_layers_is_refused(tmp_path):
    t = twins("flux", tmp_path)
    add_lora([t.empty], t.targets, "a", seed=1)
    model = swapped(t, "flux")
    with pytest.raises(vramfx.VramfxError, match="cannot be fused into layers the layer-swap path"):
        model.fuse_lora()
    run(model, t.inputs)

    again = twins("flux", tmp_path / "again")
    add_lora([again.empty], again.targets, "a", seed=1)
    again.empty.fuse_lora()  # recorded with the streamed weights, before the swap path
    with pytest.raises(vramfx.VramfxError, match="cannot be fused"):
        swapped(again, "flux")


def test_hot_load_lists_and_peft_layers_together(tmp_path):
    t = twins("flux", tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    model = swapped(t, "flux")
    torch.manual_seed(9)
    linear = model.proj_out.base_layer
    a, b = torch.randn(2, linear.in_features), torch.randn(linear.out_features, 2)
    linear.lora_A_weights, linear.lora_B_weights = [a], [b]
    eager_layer = t.eager.proj_out

    def with_hot_load(module, args, out):  # what the hot-load lists add, in eager
        return out + args[0] @ a.T @ b.T

    handle = eager_layer.base_layer.register_forward_hook(with_hot_load)
    try:
        assert_equal(t.expected(), run(model, t.inputs))
    finally:
        handle.remove()
