"""The adapter state a compiled graph is keyed on, LoRA scales as graph attributes, the fused-LoRA
decoder, and where adapters of streamed layers keep their weights."""

from __future__ import annotations

import pytest
import torch

import vramfx
from lora_models import lora_config, lora_layers
from vramfx.adapters.fused import FusedLora, lora_delta
from vramfx.adapters.scales import scales_as_buffers
from vramfx.adapters.state import adapter_state
from vramfx.capture import capture
from vramfx.weights import find_key

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def with_lora(model=None, r=2, name="a", targets=("proj", "out")):
    model = model if model is not None else Tiny()
    peft.inject_adapter_in_model(lora_config(list(targets), r=r, alpha=4), model, adapter_name=name)
    return model


def test_structure_changes_with_rank_active_set_and_fusion_but_not_with_scale():
    assert adapter_state(Tiny()) is None
    model = with_lora()
    state = adapter_state(model)
    assert state.scales == {("proj", "a"): 2.0, ("out", "a"): 2.0}
    for layer in lora_layers(model):
        layer.set_scale("a", 0.5)
    scaled = adapter_state(model)
    assert scaled.structure == state.structure and scaled.scales[("proj", "a")] == 1.0
    with_lora(model, r=3, name="b")
    assert adapter_state(model).structure != state.structure
    for layer in lora_layers(model):
        layer.set_adapter(["a", "b"])
    both = adapter_state(model).structure
    lora_layers(model)[0].merge(adapter_names=["a"])
    fused = adapter_state(model)
    assert fused.structure != both and fused.merged == {"proj": ("a",)}
    assert "proj.base_layer.weight" in fused.tensors


def test_scales_are_graph_attributes_the_model_is_left_as_it_was():
    model = with_lora()
    before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    captured = capture(model, (torch.randn(2, 8),))
    assert {(s.layer, s.adapter) for s in captured.adapter_scales} == {("proj", "a"), ("out", "a")}
    assert not any("scale" in w.name for w in captured.weights)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == before
    assert all(isinstance(layer.scaling, dict) and type(layer.scaling) is dict for layer in lora_layers(model))
    with scales_as_buffers(model) as names:
        assert set(names.values()) == {("proj", "a"), ("out", "a")}
        assert lora_layers(model)[0].scaling["a"].dtype == torch.float64
    assert lora_layers(model)[0].scaling == {"a": 2.0}


def test_scale_changes_reach_a_compiled_graph_without_capture():
    model = with_lora().eval()
    x = torch.randn(2, 8)
    fast = vramfx.compile(model, budget="16MiB", device="cpu", example_args=(x,))
    for scale in (2.0, 0.0, -3.25):
        for layer in lora_layers(model):
            layer.set_scale("a", scale)
        with torch.no_grad():
            assert torch.equal(fast(x), model(x))
    assert len(fast.compiled_graphs) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_delta_and_fused_decode_equal_peft_merge(dtype):
    model = with_lora().to(dtype)
    layer = lora_layers(model)[0]
    a, b = layer.lora_A["a"].weight.detach(), layer.lora_B["a"].weight.detach()
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    assert torch.equal(lora_delta(a, layer.lora_B["a"].weight.detach(), 2.0), layer.get_delta_weight("a"))
    stored = layer.base_layer.weight.detach().clone()
    decoder = FusedLora(tuple(stored.shape), dtype, stored.numel() * stored.element_size(),
                        lambda: [(a, layer.lora_B["a"].weight.detach(), 2.0, False, True)], rank=2)
    layer.merge(adapter_names=["a"])
    out = torch.empty_like(stored)
    decoder.decode_into(stored.reshape(-1), out)
    assert torch.equal(out, layer.base_layer.weight) and decoder.format == "lora-fused"
    assert decoder.workspace_bytes("cpu") > 0 and decoder.traffic_bytes() > stored.numel()


def test_adapters_of_streamed_layers_stay_on_the_host_others_follow_peft():
    with vramfx.skip_model_initialization():
        streamed = Tiny()
    with_lora(streamed)
    assert all(p.device.type == "cpu" for n, p in streamed.named_parameters() if "lora_" in n)
    assert streamed.proj.base_layer.weight.is_meta
    with torch.device("meta"):  # a meta model vramfx does not know: PEFT's own rule
        other = Tiny()
    with_lora(other)
    assert all(p.is_meta for p in other.parameters())


def test_base_weights_are_found_under_their_checkpoint_names():
    stored = {"proj.weight": 0, "out.bias": 0}
    assert find_key(stored, ["proj.base_layer.weight"], {}) == "proj.weight"
    assert find_key(stored, ["base_model.model.out.base_layer.bias"], {}) == "out.bias"
    assert find_key(stored, ["proj.lora_A.a.weight"], {}) is None


class _FakeEngine:
    def __init__(self) -> None:
        from vramfx.runtime.engine import ResidentStore

        self.store = ResidentStore()
        self.deactivated = 0

    def deactivate(self) -> None:
        self.deactivated += 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_binding_drops_stale_residents_and_restarts_engines_off_the_cpu(device):
    from vramfx.adapters.binding import bind_adapters

    model = with_lora()
    captured = capture(model, (torch.randn(2, 8),))
    from vramfx.weights import resolve_weights

    refs = resolve_weights(captured.weights, None)
    refs, binding = bind_adapters(adapter_state(model), captured, refs, torch.device(device))
    engine = _FakeEngine()
    name = "proj.lora_A.a.weight"
    engine.store.put(name, model.proj.lora_A["a"].weight.detach())
    binding.refresh(adapter_state(model), engine)  # nothing changed
    assert (name in engine.store) == (device == "cpu") and engine.deactivated == 0
    engine.store.put(name, model.proj.lora_A["a"].weight.detach())
    torch.utils.swap_tensors(model.proj.lora_A["a"].weight, torch.nn.Parameter(torch.zeros(2, 8)))
    binding.refresh(adapter_state(model), engine)  # the model holds other memory under the name
    assert name not in engine.store and engine.deactivated == (device != "cpu")
    assert torch.equal(refs[name].source[refs[name].key], torch.zeros(2, 8))
    assert {s.value.item() for s in binding.slots} == {2.0}
