"""PEFT LoRA layers on the layer-swap path: base layers streamed from the checkpoint under their
original names, adapters used on the computation device, outputs equal to eager PEFT."""

from __future__ import annotations

import pytest
import torch

import vramfx
from lora_models import add_lora, assert_equal, delete_adapter, first, lora_layers, set_active, twins
from test_swap_models import module_map
from vramfx.adapters.fused import FusedLora
from vramfx.swap import AutoWrappedLinear, enable_vram_management, onload, swap_stats

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


def fuse(model, scale, adapters=None):
    """diffusers' ``fuse_lora`` (scales the layers, then PEFT's merge), else PEFT's layer-level merge."""
    if hasattr(model, "fuse_lora"):
        model.fuse_lora(lora_scale=scale, adapter_names=adapters)
        return
    for layer in lora_layers(model):
        layer.scale_layer(scale)
        layer.merge(adapter_names=adapters)


def unfuse(model):
    if hasattr(model, "unfuse_lora"):
        model.unfuse_lora()
        return
    for layer in lora_layers(model):
        layer.unmerge()
        layer.unscale_layer()


class Eager:
    """The eager twin, whose base weights an unmerge puts back as they were (PEFT's subtraction
    rounds; vramfx never wrote them), so every state compares exactly."""

    def __init__(self, t):
        self.t = t
        self.base = {n: p.detach().clone() for n, p in t.eager.named_parameters() if ".base_layer." in n}

    def unfuse(self):
        unfuse(self.t.eager)
        with torch.no_grad():
            for n, p in self.t.eager.named_parameters():
                if n in self.base:
                    p.copy_(self.base[n])


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_lora_fused_before_enable_is_added_after_each_fetch(arch_name, tmp_path):
    t = twins(arch_name, tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    stored = {k: vramfx.DiskMap(tmp_path)[k] for k in vramfx.DiskMap(tmp_path)}
    for m in (t.eager, t.empty):  # recorded with the empty model's streamed weights
        fuse(m, 0.5)
    model = swapped(t, arch_name)
    assert_equal(t.expected(), run(model, t.inputs))
    assert_equal(t.expected(), run(model, t.inputs))  # a call that follows the recorded order
    stats = swap_stats(model)
    assert stats.cast_bytes > 0  # the fusions, written where the op reads the weights
    after = vramfx.DiskMap(tmp_path)
    assert all(torch.equal(stored[k], after[k]) for k in after), "the checkpoint was rewritten"


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_lora_fused_after_enable_then_unfused_and_fused_with_two_adapters(arch_name, tmp_path):
    t = twins(arch_name, tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    add_lora([t.eager, t.empty], t.targets, "b", seed=2)
    eager = Eager(t)
    for m in (t.eager, t.empty):
        set_active(m, ["a"])
    model = swapped(t, arch_name)
    unfused = t.expected()
    assert_equal(unfused, run(model, t.inputs))
    for m in (t.eager, model):
        fuse(m, 0.5)
    assert_equal(t.expected(), run(model, t.inputs))
    assert swap_stats(model).cast_bytes > 0
    eager.unfuse()
    unfuse(model)
    for m in (t.eager, model):  # the scale fuse_lora left on the layers, back to the adapter's own
        set_active(m, ["a"], [1.0])
    assert_equal(unfused, run(model, t.inputs))  # exactly: the weights were never written
    assert swap_stats(model).cast_bytes == 0
    for m in (t.eager, model):  # two adapters with weights, fused together
        set_active(m, ["a", "b"], [0.7, -0.4])
        fuse(m, 1.0, ["a", "b"])
    assert_equal(t.expected(), run(model, t.inputs))
    assert_equal(t.expected(), run(model, t.inputs))


@pytest.mark.parametrize("kept", ["planned", "onloaded"])
def test_kept_weights_follow_fusion_changes_between_calls(kept, tmp_path, monkeypatch):
    t = twins("flux", tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    eager = Eager(t)
    config = dict(DISK, onload_dtype=torch.float32, onload_device="cpu") if kept == "onloaded" else DISK
    model = enable_vram_management(t.empty, module_map("flux"), config, vram_limit=None,
                                   disk_map=vramfx.DiskMap(t.folder))
    if kept == "onloaded":
        onload(model)  # the weights rest on the computation device: used where they lie
    unfused = t.expected()
    assert_equal(unfused, run(model, t.inputs))
    assert_equal(unfused, run(model, t.inputs))
    if kept == "planned":
        assert swap_stats(model).streamed_bytes == 0 and swap_stats(model).resident
    held = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    decodes = []
    decode = FusedLora.decode_into
    monkeypatch.setattr(FusedLora, "decode_into", lambda self, *a: decodes.append(1) or decode(self, *a))
    fused_weights = len(lora_layers(model))
    for scale in (0.5, -1.5):
        for m in (t.eager, model):
            fuse(m, scale)
        decodes.clear()
        fused = run(model, t.inputs)
        assert not torch.equal(first(unfused), first(fused))
        assert_equal(t.expected(), fused)
        assert len(decodes) == fused_weights  # kept: fused once as made resident; onloaded: on each call
        decodes.clear()
        assert_equal(t.expected(), run(model, t.inputs))
        assert len(decodes) == (0 if kept == "planned" else fused_weights)
        eager.unfuse()
        unfuse(model)
        for m in (t.eager, model):
            set_active(m, ["a"], [1.0])
        assert_equal(unfused, run(model, t.inputs))
    assert all(torch.equal(held[n], p) for n, p in model.named_parameters() if n in held)


def test_a_merge_vramfx_did_not_record_is_refused_before_enabling(tmp_path):
    from peft import inject_adapter_in_model

    from lora_models import lora_config

    t = twins("flux", tmp_path)
    with torch.device("meta"):  # built outside vramfx: PEFT's merge into its meta weights is not recorded
        from tiny_models import ARCHS

        model = ARCHS["flux"].build().eval()
    inject_adapter_in_model(lora_config(t.targets), model, adapter_name="a")
    for layer in lora_layers(model):
        for part in (layer.lora_A["a"], layer.lora_B["a"]):
            part.to_empty(device="cpu")
            torch.nn.init.normal_(part.weight)
    model.fuse_lora()
    with pytest.raises(vramfx.VramfxError, match="did not see the fusion"):
        enable_vram_management(model, module_map("flux"), DISK, vram_limit=0, disk_map=vramfx.DiskMap(tmp_path))
    assert not any(isinstance(m, AutoWrappedLinear) for m in model.modules())


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
