"""LoRA adapters on compiled models equal eager PEFT models, bit for bit on CPU, and changing their
values (scales, adapter weights, a hot swap) costs no capture and no plan."""

from __future__ import annotations

import pytest
import torch

import vramfx
from lora_models import (Counter, add_lora, assert_equal, delete_adapter, lora_config, lora_layers, lora_state_dict,
                         set_active, twins)
from tiny_models import minimum_budget
from vramfx.measure import PeakMemory, release_freed_memory

pytest.importorskip("peft")

BUDGET = "64MiB"


@pytest.fixture(scope="module")
def export_state_paid() -> None:
    """torch.export's one-time process state is not the model's: an earlier compile pays it."""
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)


def compiled(t, budget=BUDGET):
    return vramfx.compile(t.empty, budget=budget, weights=vramfx.DiskMap(t.folder), device="cpu")


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_adapter_added_before_compile_streams_under_the_budget(arch_name, tmp_path, export_state_paid):
    t = twins(arch_name, tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    expected = t.expected()
    t.eager(**t.inputs)  # PEFT's and the model's one-time state paid too
    weights = vramfx.DiskMap(tmp_path)
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        minimum = minimum_budget(t.empty, weights, t.inputs)
        fast = vramfx.compile(t.empty, budget=minimum, weights=weights, device="cpu")
        assert_equal(expected, fast(**t.inputs))
        assert_equal(expected, fast(**t.inputs))
    assert peak.growth_bytes <= minimum, (peak.growth_bytes, minimum)
    planned = {w.name for w in fast.plan.weights}
    assert any(".lora_A." in n for n in planned) and any(".base_layer." in n for n in planned)
    assert fast.plan.streamed_bytes > 0 and fast.plan.peak_bytes <= minimum


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_adapters_added_after_compile_then_weighted_swapped_and_unloaded(arch_name, tmp_path, monkeypatch):
    t = twins(arch_name, tmp_path)
    count = Counter(monkeypatch)
    fast = compiled(t)
    base = t.expected()
    assert_equal(base, fast(**t.inputs))
    assert count.made == (1, 1)

    add_lora([t.eager, fast], t.targets, "a", seed=1)  # through the compiled model's passthrough
    assert_equal(t.expected(), fast(**t.inputs))
    add_lora([t.eager, fast], t.targets, "b", seed=2)
    for m in (t.eager, fast.model):
        set_active(m, ["a", "b"], [0.7, 0.3])
    assert_equal(t.expected(), fast(**t.inputs))
    made = count.made
    assert made == (3, 3)

    # Scales: the same graph and plan.
    for m in (t.eager, fast.model):
        set_active(m, ["a", "b"], [-1.5, 0.25])
    assert_equal(t.expected(), fast(**t.inputs))
    # A hot swap: other values written into the same slots, in place (as PEFT's hot swap writes them).
    for m in (t.eager, fast.model):
        torch.manual_seed(7)
        for name, p in m.named_parameters():
            if ".lora_B.a." in name:
                p.data.copy_(torch.randn_like(p))
    assert_equal(t.expected(), fast(**t.inputs))
    # Deleted and added again under the same name: new tensors, the same structure.
    for m in (t.eager, fast.model):
        delete_adapter(m, "a")
    add_lora([t.eager, fast], t.targets, "a", seed=3)
    for m in (t.eager, fast.model):
        set_active(m, ["a", "b"], [0.7, 0.3])
    assert_equal(t.expected(), fast(**t.inputs))
    assert count.made == made

    # Without adapters the layers run their base weights only.
    for m in (t.eager, fast.model):
        delete_adapter(m, "a")
        delete_adapter(m, "b")
    assert_equal(base, fast(**t.inputs))


def test_unloading_returns_to_the_base_graph(tmp_path, monkeypatch):
    t = twins("flux", tmp_path)
    count = Counter(monkeypatch)
    fast = compiled(t)
    base = t.expected()
    assert_equal(base, fast(**t.inputs))
    fast.load_lora_adapter(lora_state_dict("flux", "x", seed=1), adapter_name="a", prefix=None)
    assert any(".lora_A.a." in n for n, _ in fast.model.named_parameters())
    fast(**t.inputs)
    fast.unload_lora()
    assert_equal(base, fast(**t.inputs))
    # No new capture; the base graph is planned again to set aside the host memory of the graph
    # captured since (on CPU the budget counts it).
    assert count.captures == 2 and count.plans == 3


@pytest.mark.parametrize("arch_name", ["flux", "wan", "llama"])
def test_fused_lora_is_applied_after_the_fetch(arch_name, tmp_path, monkeypatch):
    t = twins(arch_name, tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    fast = compiled(t)
    assert_equal(t.expected(), fast(**t.inputs))
    stored = {k: vramfx.DiskMap(tmp_path)[k] for k in vramfx.DiskMap(tmp_path)}
    for m in (t.eager, fast.model):
        if hasattr(m, "fuse_lora"):
            m.fuse_lora(lora_scale=0.5)  # diffusers: scales the layers, then PEFT's merge
        else:
            for layer in lora_layers(m):
                layer.scale_layer(0.5)
                layer.merge()
    expected = t.expected()
    out = fast(**t.inputs)
    assert_equal(expected, out)
    fused = [c.name for c in fast.plan.casts]
    assert fused and all(".base_layer.weight" in n for n in fused)
    assert {w.format for w in fast.plan.weights if w.name in fused} == {"lora-fused"}
    after = vramfx.DiskMap(tmp_path)
    assert all(torch.equal(stored[k], after[k]) for k in after), "the checkpoint was rewritten"
    count = Counter(monkeypatch)
    assert_equal(expected, fast(**t.inputs))
    assert count.made == (0, 0)


def test_pipeline_load_lora_weights_on_a_compiled_transformer(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    t = twins("flux", tmp_path)
    fast = compiled(t)
    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    eager_pipe, fast_pipe = FluxPipeline(transformer=t.eager, **parts), FluxPipeline(transformer=fast, **parts)
    assert_equal(t.expected(), fast(**t.inputs))
    for pipe in (eager_pipe, fast_pipe):
        pipe.load_lora_weights(lora_state_dict("flux", "x", seed=1, prefix="transformer."), adapter_name="a")
    assert_equal(t.expected(), fast(**t.inputs))
    count = Counter(monkeypatch)
    for pipe in (eager_pipe, fast_pipe):  # diffusers' hot swap: the new LoRA's values into the old slots
        pipe.load_lora_weights(lora_state_dict("flux", "x", seed=2, prefix="transformer."), adapter_name="a",
                               hotswap=True)
    assert_equal(t.expected(), fast(**t.inputs))
    assert count.made == (0, 0)
    for pipe in (eager_pipe, fast_pipe):
        pipe.transformer.unload_lora()
    assert_equal(t.expected(), fast(**t.inputs))
    assert count.captures == 0  # the base graph, captured first (planned again: see above)


def test_pipeline_level_adapter_methods_reach_a_compiled_transformer(tmp_path):
    from diffusers import FluxPipeline

    t = twins("flux", tmp_path)
    fast = compiled(t)
    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipes = FluxPipeline(transformer=t.eager, **parts), FluxPipeline(transformer=fast, **parts)
    for pipe in pipes:
        pipe.load_lora_weights(lora_state_dict("flux", "x", seed=1, prefix="transformer."), adapter_name="a")
        pipe.set_adapters(["a"], [0.5])
    assert_equal(t.expected(), fast(**t.inputs))
    for pipe in pipes:
        pipe.unload_lora_weights()
    assert_equal(t.expected(), fast(**t.inputs))


def test_adapter_values_refresh_without_new_capture_or_plan(tmp_path, monkeypatch):
    t = twins("flux", tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    fast = compiled(t)
    fast(**t.inputs)
    count = Counter(monkeypatch)
    for weight in (0.0, 2.5, -1.0):
        for m in (t.eager, fast):
            m.set_adapters(["a"], [weight])  # diffusers' method, through the compiled model's passthrough
        assert_equal(t.expected(), fast(**t.inputs))
    assert count.made == (0, 0)
    for m in (t.eager, fast):  # new rank: a new structure, captured and planned anew
        m.delete_adapters(["a"])
    add_lora([t.eager, fast], t.targets, "a", seed=4, r=8)
    assert_equal(t.expected(), fast(**t.inputs))
    assert count.made == (1, 1)


def test_generate_with_adapters_takes_the_module_path(tmp_path):
    t = twins("llama", tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    fast = compiled(t)
    ids = t.inputs["input_ids"]

    def same_tokens():
        with torch.no_grad():
            expected = t.eager.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(expected, fast.generate(ids, max_new_tokens=4, do_sample=False))

    same_tokens()
    for m in (t.eager, fast.model):
        set_active(m, ["a"], [3.0])
    same_tokens()
    add_lora([t.eager, fast], t.targets, "b", seed=2)  # a new structure: the module path is made again
    for m in (t.eager, fast.model):
        set_active(m, ["a", "b"], [0.5, 1.5])
    same_tokens()
    assert_equal(t.expected(), fast(**t.inputs))


def test_adapters_in_another_dtype_than_the_compute_dtype_are_cast_where_read(tmp_path):
    t = twins("flux", tmp_path)
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)  # float32 adapters, computed in bfloat16
    t.eager.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in t.inputs.items()}
    fast = vramfx.compile(t.empty, budget=BUDGET, weights=vramfx.DiskMap(tmp_path), device="cpu",
                          compute_dtype=torch.bfloat16)

    def expected():
        with torch.no_grad():
            return t.eager(**inputs)

    assert_equal(expected(), fast(**inputs))
    for m in (t.eager, fast.model):  # a hot swap in place: the float32 values are read again
        torch.manual_seed(7)
        for name, p in m.named_parameters():
            if ".lora_B.a." in name:
                p.data.copy_(torch.randn_like(p))
    assert_equal(expected(), fast(**inputs))
    assert len(fast.compiled_graphs) == 1


def test_fused_then_unloaded_keeps_the_fusion_and_unfused_drops_it(tmp_path, monkeypatch):
    t = twins("flux", tmp_path)
    base = t.expected()
    add_lora([t.eager, t.empty], t.targets, "a", seed=1)
    for m in (t.eager, t.empty):  # fused before compile, on the empty model: recorded with its weights
        m.fuse_lora(lora_scale=0.7)
    fast = compiled(t)
    assert_equal(t.expected(), fast(**t.inputs))
    for m in (t.eager, fast):  # diffusers' "fuse, then drop the adapters": the fusion stays
        m.unload_lora()
    assert_equal(t.expected(), fast(**t.inputs))
    assert [w.format for w in fast.plan.weights if w.format] and not any("lora_" in w.name for w in fast.plan.weights)

    t2 = twins("flux", tmp_path / "again")
    add_lora([t2.empty], t2.targets, "a", seed=1)
    fast2 = compiled(t2)
    fast2.fuse_lora()
    fast2(**t2.inputs)
    fast2.unfuse_lora()
    fast2.unload_lora()
    assert_equal(base, fast2(**t2.inputs))  # unfused exactly: no rounding left behind


def test_a_fusion_vramfx_did_not_see_is_refused(tmp_path):
    from peft import inject_adapter_in_model

    t = twins("flux", tmp_path)
    with torch.device("meta"):  # built outside vramfx: PEFT's merge into its meta weights is not recorded
        from tiny_models import ARCHS

        model = ARCHS["flux"].build().eval()
    inject_adapter_in_model(lora_config(t.targets), model, adapter_name="a")
    for layer in lora_layers(model):  # adapter values in host memory, base weights meta
        for part in (layer.lora_A["a"], layer.lora_B["a"]):
            part.to_empty(device="cpu")
            torch.nn.init.normal_(part.weight)
    model.fuse_lora()
    with pytest.raises(vramfx.VramfxError, match="did not see the fusion"):
        vramfx.compile(model, budget=BUDGET, weights=vramfx.DiskMap(tmp_path), device="cpu", example_kwargs=t.inputs)
