"""Quantized checkpoints for tests, written here: GGUF files (with the ``gguf`` package's writer
and quantizers) and ComfyUI-style scaled-fp8 safetensors, from tiny real models.

The ``gguf`` package quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16 itself; for the k-quants it
only dequantizes, so their blocks are drawn at random (codes and 6-bit scales uniform, the fp16
super-block scales sized to the tensor's spread). Tests compare against the ``gguf`` package's
reference dequantization of whatever was written, so random blocks test decoding as well as
quantized real weights would.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

#: Bytes of each k-quant block holding an fp16 scale, and the largest |code × sub-scale| there.
_K_SCALES = {"Q2_K": ((80, 82), 45), "Q3_K": ((108,), 128), "Q4_K": ((0, 2), 945),
             "Q5_K": ((0, 2), 1953), "Q6_K": ((208,), 4096)}
#: The same for the 32-value block types.
_SCALES = {"Q4_0": ((0,), 8), "Q4_1": ((0, 2), 15), "Q5_0": ((0,), 16), "Q5_1": ((0, 2), 31),
           "Q8_0": ((0,), 127), **_K_SCALES}
#: Every quantized GGML type vramfx decodes.
QUANTIZED = tuple(_SCALES)


def random_blocks(qtype: str, count: int, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """``count`` valid blocks of ``qtype``: random codes and sub-scales, finite fp16 scales sized so
    values stay within about ``3 * spread``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(count, type_size), dtype=np.uint8)
    spots, largest = _SCALES[qtype]
    for at in spots:
        d = (rng.uniform(0.5, 1.0, size=count) * 3.0 * spread / largest).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks


def quantize(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``values`` (float32, torch shape) stored as ``qtype``: the array ``GGUFWriter.add_tensor`` takes."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(values, kind)
    block_size = gguf.GGML_QUANT_SIZES[kind][0]
    blocks = random_blocks(qtype, values.size // block_size, rng, spread=float(values.std() or 1.0))
    return blocks.reshape(*values.shape[:-1], -1)


def dequantize(stored: np.ndarray, qtype: str) -> torch.Tensor:
    """The ``gguf`` package's reference values of ``stored`` (float32)."""
    values = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def write_gguf(
    path: Path,
    tensors: Mapping[str, tuple[np.ndarray, str]],
    *,
    arch: str = "llama",
    metadata: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``name -> (float32 values, qtype)`` to a GGUF file; returns each tensor's reference
    dequantized values, as a loader of the file would see them."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    reference = {}
    for name, (values, qtype) in tensors.items():
        if values.ndim > 4:  # GGUF holds 4 dimensions: flattened, the shape recorded as ComfyUI-GGUF does
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(values.shape))
            values = values.reshape(values.shape[0], -1)
        stored = quantize(values, qtype, rng)
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, stored, raw_dtype=raw)
        reference[name] = dequantize(stored, qtype).reshape(tensors[name][0].shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def qtype_for(name: str, shape: tuple[int, ...], linear: str) -> str:
    """How the community quantizes: matrices whose rows are whole blocks in ``linear``, the rest F32."""
    if len(shape) < 2:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[linear]][0]
    return linear if shape[-1] % block == 0 else "F16"


# -- tiny real models, written the way the community ships them ---------------------------------


def llama_gguf(model: torch.nn.Module, path: Path, linear: str) -> dict[str, torch.Tensor]:
    """A transformers Llama written as llama.cpp's converter writes it: names from the gguf
    package's own table, query and key rows permuted per head; returns the model's state dict
    (Hugging Face names and row order) holding the reference dequantized values."""
    config = model.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors, sources = {}, {}
    for name, value in model.state_dict().items():
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        head = next((h for part, h in heads.items() if f".{part}." in name), None)
        data = value.float().numpy()
        if head:  # llama.cpp's converter: reshape(heads, 2, half, ...).swapaxes(1, 2)
            data = data.reshape(head, 2, data.shape[0] // head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        stored = table.get_name(name, try_suffixes=(".weight", ".bias"))
        tensors[stored] = (data, qtype_for(stored, data.shape, linear))
        sources[name] = (stored, head)
    metadata = {"llama.attention.head_count": config.num_attention_heads,
                "llama.attention.head_count_kv": config.num_key_value_heads}
    reference = write_gguf(path, tensors, arch="llama", metadata=metadata)
    out = {}
    for name, (stored, head) in sources.items():
        w = reference[stored]
        if head:
            w = w.reshape(head, w.shape[0] // head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        out[name] = w
    return out


def flux_layout(state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str], bool]]:
    """BFL's layout of a diffusers Flux state dict: (BFL name, the diffusers tensors stacked in
    it, whether its two halves are swapped)."""
    glob = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    layout = []
    for suffix in ("weight", "bias"):
        layout += [(f"{b}.{suffix}", [f"{d}.{suffix}"], False) for d, b in glob.items()]
        layout.append((f"final_layer.adaLN_modulation.1.{suffix}", [f"norm_out.linear.{suffix}"], True))
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for suffix in ("weight", "bias"):
            layout += [(f"{b}{bn}.{suffix}", [f"{d}{dn}.{suffix}"], False) for dn, bn in double.items()]
            layout.append((f"{b}img_attn.qkv.{suffix}", [f"{d}attn.to_{p}.{suffix}" for p in "qkv"], False))
            layout.append((f"{b}txt_attn.qkv.{suffix}", [f"{d}attn.add_{p}_proj.{suffix}" for p in "qkv"], False))
        layout += [(f"{b}{bn}.scale", [f"{d}{dn}.weight"], False) for dn, bn in norms.items()]
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for suffix in ("weight", "bias"):
            layout.append((f"{b}modulation.lin.{suffix}", [f"{d}norm.linear.{suffix}"], False))
            layout.append((f"{b}linear2.{suffix}", [f"{d}proj_out.{suffix}"], False))
            parts = [f"{d}attn.to_{p}.{suffix}" for p in "qkv"] + [f"{d}proj_mlp.{suffix}"]
            layout.append((f"{b}linear1.{suffix}", parts, False))
        layout.append((f"{b}norm.query_norm.scale", [f"{d}attn.norm_q.weight"], False))
        layout.append((f"{b}norm.key_norm.scale", [f"{d}attn.norm_k.weight"], False))
    return layout


def flux_gguf(model: torch.nn.Module, path: Path, linear: str) -> dict[str, torch.Tensor]:
    """A diffusers Flux written in BFL's layout, as community Flux GGUFs are; returns the model's
    state dict holding the reference dequantized values."""
    state = {k: v.float() for k, v in model.state_dict().items()}
    layout = flux_layout(state)
    assert sorted(n for _, parts, _ in layout for n in parts) == sorted(state), "the test's layout misses a tensor"
    tensors = {}
    for stored, parts, swapped in layout:
        value = torch.cat([state[p] for p in parts])
        if swapped:
            value = torch.cat(value.chunk(2)[::-1])
        data = value.numpy()
        tensors[stored] = (data, qtype_for(stored, data.shape, linear))
    reference = write_gguf(path, tensors, arch="flux")
    out = {}
    for stored, parts, swapped in layout:
        value = reference[stored]
        if swapped:
            value = torch.cat(value.chunk(2)[::-1])
        out.update(zip(parts, value.split([state[p].shape[0] for p in parts])))
    return out
