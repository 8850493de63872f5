"""Binding captured weights to sources: names, tied twins, renamed checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch

import vramfx
from vramfx.capture import capture
from vramfx.storage.checkpoint_keys import checkpoint_key_map
from vramfx.weights import resolve_weights


class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.proj(x))


def specs_of(model, *args):
    return capture(model.eval(), args).weights


def test_meta_parameters_come_from_the_weights_and_real_ones_from_the_module():
    with vramfx.skip_model_initialization():
        model = WithBuffers()
    source = {"proj.weight": torch.ones(4, 4), "proj.bias": torch.zeros(4), "norm.weight": torch.ones(4),
              "norm.bias": torch.zeros(4)}
    refs = resolve_weights(specs_of(model, torch.randn(2, 4)), vramfx.weights.as_source(source))
    assert refs["proj.weight"].key == "proj.weight"
    assert refs["norm.running_mean"].source is not refs["proj.weight"].source


def test_a_persistent_buffer_in_the_checkpoint_beats_the_modules_initial_value():
    model = WithBuffers()
    trained = {"norm.running_mean": torch.full((4,), 3.0)}
    refs = resolve_weights(specs_of(model, torch.randn(2, 4)), vramfx.weights.as_source(trained))
    out = torch.empty(16, dtype=torch.uint8)
    refs["norm.running_mean"].read_into(out)
    assert torch.equal(out.view(torch.float32), trained["norm.running_mean"])


def test_every_missing_and_mismatched_weight_is_listed():
    with vramfx.skip_model_initialization():
        model = WithBuffers()
    source = vramfx.weights.as_source({"proj.weight": torch.ones(4, 5)})
    with pytest.raises(vramfx.WeightsError) as info:
        resolve_weights(specs_of(model, torch.randn(2, 4)), source)
    message = str(info.value)
    assert "3 meta parameter(s) have no weight" in message and "proj.bias, norm.weight, norm.bias" in message
    assert "proj.weight: stored (4, 5) float32, model expects (4, 4) float32" in message


def test_bad_weights_argument_names_the_argument():
    with pytest.raises(ValueError, match="weights must be a DiskMap"):
        vramfx.weights.as_source(42)


def test_a_causal_lm_checkpoint_feeds_the_base_model_through_its_prefix(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()
    lm.save_pretrained(tmp_path)
    with vramfx.skip_model_initialization():
        base = LlamaModel(config).eval()
    weights = vramfx.DiskMap(tmp_path)
    renamed = checkpoint_key_map(base, weights)
    assert renamed["layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    ids = torch.randint(0, 64, (1, 5))
    fast = vramfx.compile(base, budget="20MiB", weights=weights, device="cpu")
    with torch.no_grad():
        expected = lm.model(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(expected, fast(input_ids=ids, use_cache=False).last_hidden_state)


def test_key_map_is_empty_for_models_without_renaming_rules():
    assert checkpoint_key_map(torch.nn.Linear(2, 2), ["weight", "bias"]) == {}


def test_storage_dtypes_read_low_files_as_they_are_and_convert_the_rest_once(tmp_path):
    from safetensors.torch import save_file

    from vramfx.storage.converted import ConvertedSource

    with vramfx.skip_model_initialization():
        model = WithBuffers()
    values = {"proj.weight": torch.randn(4, 4), "proj.bias": torch.randn(4), "norm.weight": torch.ones(4),
              "norm.bias": torch.zeros(4)}
    save_file({**values, "proj.weight": values["proj.weight"].to(torch.float8_e4m3fn)}, tmp_path / "w.safetensors")
    specs = capture(model.eval(), (torch.randn(2, 4, dtype=torch.bfloat16),), dtype=torch.bfloat16).weights
    storage = {"proj.weight": torch.bfloat16, "proj.bias": torch.float8_e4m3fn}
    disk = vramfx.DiskMap(tmp_path / "w.safetensors")
    refs = resolve_weights(specs, disk, storage=storage)
    weight, bias, mean = refs["proj.weight"], refs["proj.bias"], refs["norm.running_mean"]
    # fp8 converts exactly into bf16: read from the file as it is, cast to bf16 in the graph.
    assert (weight.dtype, weight.compute_dtype, weight.source) == (torch.float8_e4m3fn, torch.bfloat16, disk)
    assert weight.nbytes == 16
    # float32 on disk, wanted in fp8: converted once, into host memory.
    assert isinstance(bias.source, ConvertedSource) and bias.dtype == torch.float8_e4m3fn and bias.nbytes == 4
    out = torch.empty(4, dtype=torch.uint8)
    bias.read_into(out)
    assert torch.equal(out.view(torch.float8_e4m3fn).float(), values["proj.bias"].to(torch.float8_e4m3fn).float())
    # A real buffer of the module, float32, computed in bf16: converted once too.
    assert mean.dtype == torch.bfloat16 and isinstance(mean.source, ConvertedSource)
    with pytest.raises(vramfx.WeightsError, match=r"proj.weight: stored \(4, 4\) float8_e4m3fn, model expects"):
        resolve_weights(specs, disk)  # without storage dtypes the file must hold the graph's dtype
