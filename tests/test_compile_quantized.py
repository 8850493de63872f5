"""compile from quantized community checkpoints: a tiny Llama from a llama.cpp GGUF, a tiny Flux
from a BFL-layout GGUF and from a ComfyUI scaled-fp8 file, a tiny Wan from a scaled-fp8 file in
Wan's own layout — each equal to eager run on the reference dequantized weights, moving exactly
the quantized bytes of the weights it streams."""

from __future__ import annotations

import json
import threading

import pytest
import safetensors.torch
import torch

import vramfx
from gguf_files import flux_gguf, llama_gguf
from tiny_models import assert_same_output, minimum_budget
from vramfx.measure import PeakMemory, release_freed_memory

pytest.importorskip("gguf")


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    # Width 256: rows of whole 256-value k-quant blocks, as in real Flux (3072).
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                  pooled_projection_dim=256, axes_dims_rope=(16, 56, 56)).eval()


def empty_like(build, **kwargs):
    with vramfx.skip_model_initialization():
        return build(**kwargs)


def llama_inputs():
    return {"input_ids": torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1)), "use_cache": False}


def flux_inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 16, 16, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(1, 8, 256, generator=g).to(dtype),
            "pooled_projections": torch.randn(1, 256, generator=g).to(dtype),
            "timestep": torch.tensor([0.5], dtype=dtype), "img_ids": torch.zeros(16, 3, dtype=dtype),
            "txt_ids": torch.zeros(8, 3, dtype=dtype), "return_dict": False}


class ReadCounter:
    """Counts the bytes a source's file reader hands out (wraps its range reads)."""

    def __init__(self, reader) -> None:
        self.nbytes = 0
        self._lock = threading.Lock()
        original = reader.read_range_into

        def counted(key, start, out, **kwargs):
            with self._lock:
                self.nbytes += out.numel()
            return original(key, start, out, **kwargs)

        reader.read_range_into = counted


def run_and_count(fast, weights, inputs, calls=2):
    """Outputs of ``calls`` calls after the first, and the bytes read by the last one."""
    fast(**inputs)
    counter = ReadCounter(weights.base)
    outputs = []
    for _ in range(calls):
        counter.nbytes = 0
        outputs.append(fast(**inputs))
    return outputs, counter.nbytes


def stored_bytes(weights, plan, names):
    """Bytes of ``names`` as the file's header stores them (a split tensor's share of its rows)."""
    refs = {w.name: w for w in plan.weights}
    total = 0
    for name in names:
        view = weights.view(name)
        assert refs[name].nbytes == view.info.nbytes
        total += view.info.nbytes
    return total


@pytest.mark.parametrize("linear", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"])
def test_llama_from_a_llama_cpp_gguf_equals_eager_and_streams_its_quantized_bytes(linear, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    model.load_state_dict(llama_gguf(model, tmp_path / "llama.gguf", linear))
    inputs = llama_inputs()
    with torch.no_grad():
        expected = model(**inputs)

    weights = vramfx.GGUFMap(tmp_path / "llama.gguf")
    empty = empty_like(tiny_llama)
    budget = minimum_budget(empty, weights, inputs) + weights.nbytes // 4
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=inputs, calls=3)
    outputs, moved = run_and_count(fast, weights, inputs)
    for out in outputs:
        assert_same_output(expected, out)
    plan = fast.plan
    streamed = {n for t in plan.transfers for n in t.names}
    assert streamed and plan.peak_bytes <= budget
    assert moved == plan.streamed_bytes == stored_bytes(weights, plan, [n for t in plan.transfers for n in t.names])
    quantized = [w for w in plan.weights if w.format == linear]
    assert quantized and all(w.dtype == "uint8" and w.compute_dtype == "float32" for w in quantized)
    assert {s.transfer == -1 for s in plan.steps if s.op == "cast"} == {True, False}, "resident and streamed decoded"
    state, eager_state = fast.state_dict(), model.state_dict()
    assert list(state) == list(eager_state), "state_dict decodes the stored blocks under the model's names"
    assert all(torch.equal(eager_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("linear", ["Q4_K", "Q8_0"])
def test_flux_from_a_bfl_layout_gguf_equals_eager_in_bf16(linear, tmp_path):
    torch.manual_seed(0)
    model = tiny_flux()
    model.load_state_dict(flux_gguf(model, tmp_path / "flux.gguf", linear))
    inputs = flux_inputs()
    with torch.no_grad():
        expected = model.to(torch.bfloat16)(**inputs)

    weights = vramfx.GGUFMap(tmp_path / "flux.gguf")
    assert weights.decoder("transformer_blocks.0.attn.to_k.weight").format == linear, "qkv split into views"
    empty = empty_like(tiny_flux)
    options = {"compute_dtype": torch.bfloat16}
    budget = minimum_budget(empty, weights, inputs, **options) + weights.nbytes // 4
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=inputs, calls=3,
                          **options)
    outputs, moved = run_and_count(fast, weights, inputs)
    for out in outputs:
        assert_same_output(expected, out)
    plan = fast.plan
    assert moved == plan.streamed_bytes == stored_bytes(weights, plan, [n for t in plan.transfers for n in t.names])
    assert plan.streamed_bytes > 0 and plan.peak_bytes <= budget


def _scaled_fp8(state, *, current: bool):
    """ComfyUI's scaled fp8: every matrix in e4m3 with its float32 scale, the rest in bf16; the
    values a loader sees are ``fp8.to(dtype) * scale``."""
    stored, values = {} if current else {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for name, w in state.items():
        if w.dim() == 2 and name.endswith(".weight"):
            scale = (w.abs().amax().float() / 448.0).clamp_min(1e-12)
            fp8 = (w.float() / scale).to(torch.float8_e4m3fn)
            layer = name[: -len(".weight")]
            stored[name] = fp8
            if current:
                stored[layer + ".weight_scale"] = scale
                stored[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                              dtype=torch.uint8)
            else:
                stored[layer + ".scale_weight"] = scale.reshape(1)
            values[name] = fp8.to(torch.bfloat16) * scale
        else:
            stored[name] = w.to(torch.bfloat16)
            values[name] = stored[name]
    return stored, values


def test_flux_from_a_comfyui_scaled_fp8_file_in_bfl_layout_equals_eager(tmp_path):
    from gguf_files import flux_layout

    torch.manual_seed(0)
    model = tiny_flux()
    state = model.state_dict()
    bfl = {}
    for stored_name, parts, swapped in flux_layout(state):
        value = torch.cat([state[p] for p in parts])
        bfl[stored_name] = torch.cat(value.chunk(2)[::-1]) if swapped else value
    stored, values = _scaled_fp8(bfl, current=False)
    safetensors.torch.save_file({f"model.diffusion_model.{k}": v for k, v in stored.items()},
                                tmp_path / "flux_fp8_scaled.safetensors")
    reference = {}
    for stored_name, parts, swapped in flux_layout(state):
        value = values[stored_name]
        value = torch.cat(value.chunk(2)[::-1]) if swapped else value
        reference.update(zip(parts, value.split([state[p].shape[0] for p in parts])))
    model = model.to(torch.bfloat16)
    model.load_state_dict(reference)
    inputs = flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)

    empty = empty_like(tiny_flux)
    path = tmp_path / "flux_fp8_scaled.safetensors"
    fast = vramfx.compile(empty, budget=minimum_budget(empty, path, inputs, compute_dtype=torch.bfloat16) + 2**20,
                          weights=path, device="cpu", compute_dtype=torch.bfloat16)
    assert_same_output(expected, fast(**inputs))
    formats = {w.format for w in fast.plan.weights}
    assert "float8_e4m3fn*scale" in formats and fast.plan.streamed_bytes > 0


def test_wan_from_a_scaled_fp8_file_in_wan_layout_current_convention(tmp_path):
    """Wan's original names (renamed by diffusers' own converter to find each tensor), the current
    ComfyUI convention (``weight_scale``, ``comfy_quant``), a DiskMap passed in: scales are found."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from test_layouts import _wan_original_shapes
    from tiny_models import ARCHS, build_empty

    torch.manual_seed(0)
    arch = ARCHS["wan"]
    model = arch.build().eval()
    state = model.state_dict()
    names = {key: next(iter(convert_wan_transformer_to_diffusers({key: torch.zeros(1)})))
             for key in _wan_original_shapes()}
    assert sorted(names.values()) == sorted(state)
    stored, values = _scaled_fp8({key: state[name] for key, name in names.items()}, current=True)
    safetensors.torch.save_file(stored, tmp_path / "wan_fp8_scaled.safetensors")
    model = model.to(torch.bfloat16)
    model.load_state_dict({names[k]: v for k, v in values.items()})
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in arch.inputs().items()}
    with torch.no_grad():
        expected = model(**inputs)

    empty = build_empty(arch)
    weights = vramfx.DiskMap(tmp_path / "wan_fp8_scaled.safetensors")
    fast = vramfx.compile(empty, budget=minimum_budget(empty, weights, inputs, compute_dtype=torch.bfloat16) + 2**20,
                          weights=weights, device="cpu", compute_dtype=torch.bfloat16)
    assert_same_output(expected, fast(**inputs))
    assert "float8_e4m3fn*scale" in {w.format for w in fast.plan.weights}


def test_wan_from_a_wan_layout_gguf_with_a_flattened_patch_embedding(tmp_path):
    """Wan's own names in a Q8_0 GGUF, the 5-D patch embedding flattened with its shape recorded
    (``comfy.gguf.orig_shape``), as ComfyUI-GGUF's converter writes it."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from gguf_files import qtype_for, write_gguf
    from test_layouts import _wan_original_shapes
    from tiny_models import ARCHS, build_empty

    torch.manual_seed(0)
    arch = ARCHS["wan"]
    model = arch.build().eval()
    state = model.state_dict()
    names = {key: next(iter(convert_wan_transformer_to_diffusers({key: torch.zeros(1)})))
             for key in _wan_original_shapes()}
    tensors = {}
    for key, name in names.items():
        values = state[name].float().numpy()
        tensors[key] = (values, qtype_for(key, values.shape, "Q8_0") if values.ndim <= 2 else "F16")
    reference = write_gguf(tmp_path / "wan.gguf", tensors, arch="wan")
    model.load_state_dict({names[k]: v for k, v in reference.items()})
    inputs = arch.inputs()
    with torch.no_grad():
        expected = model(**inputs)

    weights = vramfx.GGUFMap(tmp_path / "wan.gguf")
    assert weights["patch_embedding.weight"].shape == (32, 4, 1, 2, 2)
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget=minimum_budget(empty, weights, inputs) + 2**16, weights=weights, device="cpu")
    assert_same_output(expected, fast(**inputs))
    assert "Q8_0" in {w.format for w in fast.plan.weights}


def test_gguf_budget_is_kept_measured_as_rss_anon(tmp_path):
    """A Llama of 4 layers at width 512 in Q4_K streams under a budget a third of its weights,
    its decode buffers and workspace inside the plan, measured as RssAnon over calls."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, vocab_size=1024,
                       num_attention_heads=8, num_key_value_heads=4)
    reference = llama_gguf(model, tmp_path / "llama.gguf", "Q4_K")
    model.load_state_dict(reference)
    inputs = {"input_ids": torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}
    with torch.no_grad():
        expected = model(**inputs).logits
    del model, reference
    weights = vramfx.GGUFMap(tmp_path / "llama.gguf")
    empty = empty_like(tiny_llama, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, vocab_size=1024,
                       num_attention_heads=8, num_key_value_heads=4)
    budget = minimum_budget(empty, weights, inputs) + weights.nbytes // 3
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=inputs, calls=3)
    fast(**inputs)
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        outputs = [fast(**inputs).logits for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    assert fast.plan.streamed_bytes > 0 and fast.plan.peak_bytes <= budget
    assert peak.growth_bytes <= budget + 4 * 2**20, (peak.growth_bytes, budget)


def test_the_cuda_engine_decodes_on_the_compute_side_with_the_same_result(tmp_path):
    from fake_streams import ThreadStreams
    from test_runtime_cuda import small_pinned, use_cuda_engine

    torch.manual_seed(0)
    model = tiny_llama()
    model.load_state_dict(llama_gguf(model, tmp_path / "llama.gguf", "Q4_K"))
    inputs = llama_inputs()
    with torch.no_grad():
        expected = model(**inputs)
    weights = vramfx.GGUFMap(tmp_path / "llama.gguf")
    empty = empty_like(tiny_llama)
    budget = minimum_budget(empty, weights, inputs) + 16 * 2**10
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=inputs)
    use_cuda_engine(fast, ThreadStreams(copy_delay_s=0.0005), pinned=small_pinned())
    assert fast.plan.casts and fast.plan.transfers
    for _ in range(2):
        assert_same_output(expected, fast(**inputs))
