"""DiffSynth-Studio's own Wan and Qwen-Image DiTs, module maps and pipelines' model functions, switched
to vramfx by changing imports only (optional: skipped when DiffSynth-Studio is not installed).

Install: ``pip install --no-deps diffsynth==2.1.12`` and ``pip install -e '.[diffsynth-test]'``.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from safetensors.torch import save_file

import vramfx
import vramfx.swap
from diffsynth_models import QWEN_MAP, WAN_MAP, missing

if missing():
    pytest.skip(f"DiffSynth-Studio is not installed ({', '.join(missing())} missing)", allow_module_level=True)

from diffsynth_models import classes, load, qwen_inputs, tiny_qwen, tiny_wan, wan_inputs  # noqa: E402

#: A low-VRAM config as DiffSynth-Studio's examples write it: weights on disk, computed on the device.
VRAM_CONFIG = dict(
    offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk",
    preparing_dtype=torch.float32, preparing_device="cpu", computation_dtype=torch.float32, computation_device="cpu",
)
STEPS = 3
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def ds() -> types.SimpleNamespace:
    return load()


def original(ds) -> types.SimpleNamespace:
    """``from diffsynth.core.vram import ...``"""
    return types.SimpleNamespace(enable_vram_management=ds.enable_vram_management, DiskMap=ds.DiskMap,
                                 skip_model_initialization=ds.layers.skip_model_initialization)


def switched() -> types.SimpleNamespace:
    """``from vramfx.swap import ...``: the only change."""
    return types.SimpleNamespace(enable_vram_management=vramfx.swap.enable_vram_management,
                                 DiskMap=vramfx.swap.DiskMap, skip_model_initialization=vramfx.skip_model_initialization)


def user_code(lib, build, path, module_map, model_fn, steps, vram_limit=None):
    """What a DiffSynth-Studio user writes: an empty model, its module map, and the pipeline's
    denoising loop calling the model function twice per step (classifier-free guidance)."""
    with lib.skip_model_initialization():
        dit = build()
    dit = lib.enable_vram_management(dit, module_map, vram_config=VRAM_CONFIG, vram_limit=vram_limit,
                                     disk_map=lib.DiskMap(str(path), "cpu"))
    outputs = []
    with torch.no_grad():
        for positive, negative in steps:
            outputs += [model_fn(dit=dit, **positive), model_fn(dit=dit, **negative)]
    return dit, outputs


def saved(ds, build, tmp_path):
    torch.manual_seed(0)
    eager = build()
    path = tmp_path / "dit.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path


def guidance_steps(make_inputs):
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        positive = make_inputs(g)
        negative = dict(positive, **{k: v for k, v in make_inputs(g).items() if k in ("context", "prompt_emb")})
        steps.append((positive, negative))
    return steps


@pytest.mark.parametrize(
    ("model", "map_name", "limit_gb"),
    [("wan", WAN_MAP, 0.0003), ("qwen", QWEN_MAP, 0.0004)],  # about 40% of each model's weights
)
def test_the_pipelines_model_function_equals_eager_with_the_planner_engaged(ds, tmp_path, model, map_name, limit_gb):
    build = (lambda: tiny_wan(ds)) if model == "wan" else (lambda: tiny_qwen(ds))
    model_fn = ds.model_fn_wan_video if model == "wan" else ds.model_fn_qwen_image
    eager, path = saved(ds, build, tmp_path)
    steps = guidance_steps(wan_inputs if model == "wan" else qwen_inputs)
    with torch.no_grad():
        expected = [model_fn(dit=eager, **inputs) for step in steps for inputs in step]
    module_map = classes(ds.maps[map_name])  # DiffSynth-Studio's own map, its classes imported as it does

    _, theirs = user_code(original(ds), build, path, module_map, model_fn, steps)
    dit, ours = user_code(switched(), build, path, module_map, model_fn, steps, vram_limit=limit_gb)
    assert all(torch.equal(e, t) for e, t in zip(expected, theirs)), "the reference path equals eager"
    assert all(torch.equal(e, o) for e, o in zip(expected, ours))

    stats = vramfx.swap.swap_stats(dit)
    assert dit.vram_management_enabled
    assert stats.calls == 2 * STEPS and stats.order, "each model function call is a pass"
    assert stats.resident and stats.prefetched > 0 and stats.synchronous == 0, "kept weights, the rest fetched ahead"
    assert stats.held_peak_bytes <= int(limit_gb * 2**30)


def test_the_originals_diskmap_object_and_whole_model_wrap(ds, tmp_path):
    build = lambda: tiny_wan(ds)  # noqa: E731
    eager, path = saved(ds, build, tmp_path)
    (positive, _), *_ = guidance_steps(wan_inputs)
    with vramfx.skip_model_initialization():
        dit = build()
    wrapper = vramfx.swap.enable_vram_management(  # the map as strings, the original's DiskMap object
        dit, {WAN_MAP: "diffsynth.core.vram.layers.AutoWrappedModule"}, VRAM_CONFIG, disk_map=ds.DiskMap(str(path), "cpu")
    )
    assert isinstance(wrapper, vramfx.swap.AutoWrappedModule) and wrapper.vram_management_enabled
    assert wrapper.patch_size == (1, 2, 2) and wrapper.seperated_timestep is False, "read from the model"
    wrapper.onload()  # as the pipeline does before its loop: the whole model on the computation device
    with torch.no_grad():
        assert torch.equal(ds.model_fn_wan_video(dit=eager, **positive), ds.model_fn_wan_video(dit=wrapper, **positive))


def wan_lora(seed=3):
    """A rank-4 LoRA on three of the tiny Wan DiT's linears, in DiffSynth-Studio's key format."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (out_features, in_features) in {"blocks.0.self_attn.q": (64, 64), "blocks.1.ffn.0": (128, 64),
                                               "head.head": (64, 64)}.items():
        lora[f"{name}.lora_A.weight"] = torch.randn(4, in_features, generator=g)
        lora[f"{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=g)
    return lora


def test_the_pipeline_moves_states_and_hot_loads_lora_into_vramfx_wrappers(ds, tmp_path, monkeypatch):
    build = lambda: tiny_wan(ds)  # noqa: E731
    _, path = saved(ds, build, tmp_path)
    (positive, _), *_ = guidance_steps(wan_inputs)
    lora = wan_lora()
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)  # the pipeline calls it on its device

    outputs = {}
    for name, lib in (("theirs", original(ds)), ("ours", switched())):
        with lib.skip_model_initialization():
            dit = build()
        dit = lib.enable_vram_management(dit, classes(ds.maps[WAN_MAP]), vram_config=VRAM_CONFIG,
                                         disk_map=lib.DiskMap(str(path), "cpu"))
        pipe = ds.WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
        pipe.dit = dit
        pipe.vram_management_enabled = pipe.check_vram_management_state()
        pipe.load_models_to_device(["dit"])  # calls onload() on every wrapper
        pipe.load_lora(pipe.dit, state_dict=dict(lora), alpha=0.5, verbose=0)
        with torch.no_grad():
            with_lora = [ds.model_fn_wan_video(dit=dit, **positive) for _ in range(2)]
            pipe.clear_lora(verbose=0)
            without = ds.model_fn_wan_video(dit=dit, **positive)
        outputs[name] = (with_lora, without)
    states = {m.state for m in dit.modules() if isinstance(m, vramfx.swap.AutoWrappedLinear)}
    assert states == {1}, "every wrapper onloaded (the original's move on to 2 as they run; vramfx's stay)"
    (theirs_lora, theirs_plain), (ours_lora, ours_plain) = outputs["theirs"], outputs["ours"]
    assert all(torch.equal(t, o) for t, o in zip(theirs_lora, ours_lora))
    assert torch.equal(theirs_plain, ours_plain) and not torch.equal(ours_lora[0], ours_plain)


@pytest.mark.parametrize("limit_gb", [None, 0.0003])  # every weight kept; about 40% kept, the rest streamed
def test_the_pipelines_fusing_lora_loader_on_wrapped_modules_equals_eager(ds, tmp_path, monkeypatch, limit_gb):
    build = lambda: tiny_wan(ds)  # noqa: E731
    eager, path = saved(ds, build, tmp_path)
    (positive, _), *_ = guidance_steps(wan_inputs)
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)
    eager_pipe = ds.WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    eager_pipe.dit = eager
    eager_pipe.load_lora(eager, state_dict=wan_lora(), alpha=0.5, verbose=0)  # fused into its weights
    with torch.no_grad():
        expected = ds.model_fn_wan_video(dit=eager, **positive)

    with vramfx.skip_model_initialization():
        dit = build()
    dit = vramfx.swap.enable_vram_management(dit, classes(ds.maps[WAN_MAP]), VRAM_CONFIG, vram_limit=limit_gb,
                                             disk_map=vramfx.DiskMap(path))
    pipe = ds.WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = dit
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    pipe.load_models_to_device(["dit"])
    with torch.no_grad():
        plain = ds.model_fn_wan_video(dit=dit, **positive)
    # Its layers are named under the wrappers' ".module": fused by vramfx after each fetch, not missed.
    pipe.load_lora(pipe.dit, state_dict=wan_lora(), alpha=0.5, hotload=False, verbose=0)
    with torch.no_grad():
        outputs = [ds.model_fn_wan_video(dit=dit, **positive) for _ in range(3)]
    assert not torch.equal(plain, expected)
    assert all(torch.equal(expected, o) for o in outputs)
    assert vramfx.swap.swap_stats(dit).cast_bytes > 0
    assert not any(p.is_inference() or not p.is_meta for n, p in dit.named_parameters() if "blocks.0.self_attn.q" in n)

    conv = {"patch_embedding.lora_A.weight": torch.ones(4, 16, 1, 1),
            "patch_embedding.lora_B.weight": torch.ones(64, 4, 1, 1)}
    with pytest.raises(vramfx.VramfxError, match="only 2-D"):
        pipe.load_lora(pipe.dit, state_dict=conv, hotload=False, verbose=0)


def test_the_fp8_linear_computes_as_the_originals(ds):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16) * 300  # rows beyond fp8's range are scaled
    config = dict(offload_dtype=torch.bfloat16, offload_device="cpu", computation_dtype=torch.float8_e4m3fn,
                  computation_device="cpu")
    ours = vramfx.swap.AutoWrappedLinear(copy.deepcopy(linear), **config)
    theirs = ds.layers.AutoWrappedLinear(linear, **config)
    theirs.onload()  # its weights in fp8, where its forward reads them
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
