"""Scaled-fp8 checkpoints: weights served with their scales, in both ComfyUI conventions, never
without them."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import vramfx
from vramfx.errors import WeightsError
from vramfx.weights import as_source

FP8 = torch.float8_e4m3fn


def _record(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _checkpoint(current: bool, layer: str = "fc") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear layer as ComfyUI stores it, and its weight's value ``fp8 * scale`` in float32."""
    torch.manual_seed(0)
    w = torch.randn(8, 4) * 3
    scale = w.abs().amax() / 448
    fp8 = (w / scale).to(FP8)
    if current:
        sd = {f"{layer}.weight": fp8, f"{layer}.weight_scale": scale, f"{layer}.input_scale": torch.tensor(1.0),
              f"{layer}.comfy_quant": _record("float8_e4m3fn")}
    else:
        sd = {f"{layer}.weight": fp8, f"{layer}.scale_weight": scale.reshape(1), f"{layer}.scale_input": torch.ones(1),
              "scaled_fp8": torch.empty(0, dtype=FP8)}
    sd[f"{layer}.bias"] = torch.randn(8)
    return sd, fp8.to(torch.float32) * scale


@pytest.mark.parametrize("current", [False, True], ids=["scale_weight", "weight_scale"])
def test_both_conventions_serve_scaled_values_and_hide_format_tensors(current, tmp_path):
    sd, expected = _checkpoint(current)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    for source in (vramfx.ScaledFP8Map(tmp_path / "m.safetensors"), as_source(vramfx.DiskMap(tmp_path / "m.safetensors")),
                   as_source(str(tmp_path / "m.safetensors")), as_source(sd)):
        assert isinstance(source, vramfx.ScaledFP8Map)
        assert sorted(source) == ["fc.bias", "fc.weight"]
        assert torch.equal(source["fc.weight"], expected)
        info = source.info("fc.weight")
        assert (info.shape, info.dtype, info.nbytes) == ((32,), FP8, 32), "the fp8 bytes are what moves"
        assert source.decoder("fc.weight").format == "float8_e4m3fn*scale" and source.decoder("fc.bias") is None


def test_compiled_linear_equals_comfyui_dequantize_in_bf16():
    sd, _ = _checkpoint(current=False, layer="0")
    with vramfx.skip_model_initialization():
        empty = torch.nn.Sequential(torch.nn.Linear(4, 8))
    eager = torch.nn.Sequential(torch.nn.Linear(4, 8)).to(torch.bfloat16)
    # ComfyUI's fp8 layout: the weight in the compute dtype times the float32 scale (a scalar).
    eager[0].weight.data = sd["0.weight"].to(torch.bfloat16) * sd["0.scale_weight"].reshape(())
    eager[0].bias.data = sd["0.bias"].to(torch.bfloat16)
    x = torch.randn(3, 4).to(torch.bfloat16)
    fast = vramfx.compile(empty, budget=10**8, weights=sd, device="cpu", compute_dtype=torch.bfloat16)
    assert torch.equal(fast(x), eager(x))
    assert {w.name: w.format for w in fast.plan.weights}["0.weight"] == "float8_e4m3fn*scale"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda sd: sd.update({"fc.scale_weight": torch.ones(8, 1)}), "one float scale per tensor"),
        (lambda sd: sd.update({"fc.weight": sd["fc.weight"].float()}), "not an fp8 tensor"),
        (lambda sd: sd.update({"other.scale_weight": torch.ones(1)}), "missing, not an fp8 tensor"),
        (lambda sd: sd.update({"fc.comfy_quant": _record("nvfp4")}), "stored as 'nvfp4'"),
    ],
    ids=["per-channel", "not-fp8", "orphan-scale", "other-format"],
)
def test_scales_that_cannot_be_honoured_are_refused(change, match):
    sd, _ = _checkpoint(current=False)
    change(sd)
    with pytest.raises(WeightsError, match=match):
        as_source(sd)


def test_the_layer_swap_path_reads_a_scaled_source_with_its_scales(tmp_path):
    """Streamed from disk, or onloaded to host memory as the file stores it: decoded per call."""
    from vramfx.swap import AutoWrappedLinear, enable_vram_management, onload, swap_stats

    sd, weight = _checkpoint(current=False, layer="0")
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    x = torch.randn(3, 4)
    for onloaded in (False, True):
        bias = sd["0.bias"].to(torch.bfloat16).float() if onloaded else sd["0.bias"]
        expected = torch.nn.functional.linear(x, weight, bias)
        with vramfx.skip_model_initialization():
            model = torch.nn.Sequential(torch.nn.Linear(4, 8))
        # onload_dtype bf16 would round the bias; the decoded weight keeps its stored fp8 whatever it says.
        config = dict(offload_dtype="disk", offload_device="disk", onload_dtype=torch.bfloat16, onload_device="cpu",
                      computation_dtype=torch.float32, computation_device="cpu")
        enable_vram_management(model, module_map={torch.nn.Linear: AutoWrappedLinear}, vram_config=config,
                               vram_limit=0, disk_map=vramfx.DiskMap(tmp_path / "m.safetensors"))
        if onloaded:
            onload(model)
            home = model[0]._vramfx_unit.home[0]
            assert home.dtype == FP8 and home.numel() == 32, "held as the file stores it, not rounded again"
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(expected, model(x))
        assert swap_stats(model).cast_bytes > 0