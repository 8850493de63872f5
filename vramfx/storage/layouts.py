"""The layouts community checkpoints ship in, mapped to the state-dict names of the models vramfx runs.

Quantized Flux and Wan files (GGUF, ComfyUI's scaled fp8) keep the original authors' layout, and
GGUF language models keep llama.cpp's; diffusers and transformers models name and shape those
tensors differently. Each mapping here is a list of :class:`Rename` s — a model name, the stored
tensor it comes from, optionally a row range of it (a fused projection split without copying) and
a row order restored while decoding — computed from names and shapes alone:

- **llama.cpp → transformers Llama** (GGUF ``general.architecture = "llama"``): ``token_embd``,
  ``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``, ``attn_norm``, ``ffn_norm``,
  ``output_norm``, ``output`` to ``LlamaForCausalLM``'s names. llama.cpp's converter permutes
  the rows of each head's query and key projections for its rotary kernel; they are put back
  while decoding (``RowOrder("rope_halves")``, with the head counts from the file's metadata).
- **BFL Flux → diffusers ``FluxTransformer2DModel``** (``double_blocks.N.img_attn.qkv``, ...):
  the fused ``qkv`` and single-block ``linear1`` are split into row ranges (on block
  boundaries, so quantized files split without decoding), and the final modulation's shift and
  scale halves are swapped, as diffusers' own single-file converter does.
- **Wan → diffusers ``WanTransformer3DModel``** (``blocks.N.self_attn.q``, ...): renames only,
  including the swap of ``norm2``/``norm3`` and the image-conditioning (I2V) layers.

A ComfyUI checkpoint's ``model.diffusion_model.`` prefix is stripped first. Tensors no mapping
covers keep their stored names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vramfx.errors import WeightsError
from vramfx.quant.decoders import RowOrder
from vramfx.storage.views import View, reordered_view, row_view

Shapes = Mapping[str, tuple[int, ...]]

COMFY_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Rename:
    """Model tensor ``name`` is stored tensor ``key``, or its rows ``rows``, in ``order``."""

    name: str
    key: str
    rows: tuple[int, int] | None = None
    order: RowOrder | None = None


def community_renames(shapes: Shapes, metadata: Mapping[str, Any] | None = None) -> list[Rename]:
    """The renames that bring a checkpoint in a known community layout to the model's names.

    Parameters
    ----------
    shapes:
        Stored tensor name to its shape (values' shape, torch order).
    metadata:
        GGUF metadata (``general.architecture``, head counts); empty for safetensors.

    Returns
    -------
    list[Rename]
        Empty when the names are in no known layout.

    Examples
    --------
    >>> renames = community_renames({"blocks.0.self_attn.q.weight": (8, 8), "head.head.weight": (4, 8)})
    >>> [(r.key, r.name) for r in renames]
    [('blocks.0.self_attn.q.weight', 'blocks.0.attn1.to_q.weight'), ('head.head.weight', 'proj_out.weight')]
    """
    metadata = metadata or {}
    renames = [Rename(k[len(COMFY_PREFIX):], k) for k in shapes if k.startswith(COMFY_PREFIX)]
    if renames:
        stripped = {r.name: shapes[r.key] for r in renames}
        shapes = {**{k: v for k, v in shapes.items() if not k.startswith(COMFY_PREFIX)}, **stripped}
    original = {r.name: r.key for r in renames}
    converted: list[Rename] = []
    if any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in shapes):
        converted = _flux(shapes)
    elif any(_WAN_BLOCK.match(k) for k in shapes) and "head.head.weight" in shapes:
        converted = _wan(shapes)
    elif metadata.get("general.architecture") == "llama" and any(k.startswith("blk.") for k in shapes):
        converted = _llama(shapes, metadata)
    # A renamed tensor's key is its stored key, before the ComfyUI prefix was stripped.
    converted = [Rename(r.name, original.get(r.key, r.key), r.rows, r.order) for r in converted]
    taken = {r.key for r in converted}
    return converted + [r for r in renames if r.key not in taken]


def apply_renames(views: Mapping[str, View], renames: Sequence[Rename]) -> dict[str, View]:
    """``views`` under the renamed names, stored tensors no rename uses under their own.

    Raises
    ------
    WeightsError
        If a rename names a tensor the views lack, or two renames give one name.
    """
    out: dict[str, View] = {}
    used: set[str] = set()
    for r in renames:
        if r.key not in views:
            raise WeightsError(f"layout mapping needs stored tensor {r.key!r}, which is missing")
        view = views[r.key]
        if r.rows is not None:
            view = row_view(view, *r.rows)
        if r.order is not None:
            view = reordered_view(view, r.order)
        if r.name in out:
            raise WeightsError(f"two stored tensors map to {r.name!r}; the second is {r.key!r}")
        out[r.name] = view
        used.add(r.key)
    for name, view in views.items():
        if name not in used and name not in out:
            out[name] = view
    return out


# -- llama.cpp ---------------------------------------------------------------------------------

_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _llama(shapes: Shapes, metadata: Mapping[str, Any]) -> list[Rename]:
    heads = metadata.get("llama.attention.head_count")
    kv_heads = metadata.get("llama.attention.head_count_kv", heads)
    out = []
    for key in shapes:
        stem, _, suffix = key.rpartition(".")
        if stem in _LLAMA_GLOBAL and suffix in ("weight", "bias"):
            out.append(Rename(f"{_LLAMA_GLOBAL[stem]}.{suffix}", key))
            continue
        match = _LLAMA_KEY.match(key)
        if not match or match.group(2) not in _LLAMA_BLOCK:
            continue
        block, part, suffix = match.groups()
        order = None
        if part in ("attn_q", "attn_k"):
            count = heads if part == "attn_q" else kv_heads
            if not isinstance(count, int) or count < 1:
                raise WeightsError(
                    f"{key}: the file's metadata lacks llama.attention.head_count(_kv), needed to put its "
                    "rows back in the model's order"
                )
            order = RowOrder("rope_halves", heads=count)
        out.append(Rename(f"model.layers.{block}.{_LLAMA_BLOCK[part]}.{suffix}", key, order=order))
    return out


# -- Flux (BFL layout) ---------------------------------------------------------------------------

_FLUX_GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_FLUX_SINGLE = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_FLUX_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")


def _flux(shapes: Shapes) -> list[Rename]:
    out = []
    for key, shape in shapes.items():
        stem, _, suffix = key.rpartition(".")
        if stem in _FLUX_GLOBAL:
            out.append(Rename(f"{_FLUX_GLOBAL[stem]}.{suffix}", key))
        elif stem == "final_layer.adaLN_modulation.1":
            out.append(Rename(f"norm_out.linear.{suffix}", key, order=RowOrder("swap_halves")))
        elif match := _FLUX_BLOCK.match(key):
            out.extend(_flux_block(key, shape, *match.groups(), shapes))
    return out


def _flux_block(key: str, shape: tuple[int, ...], kind: str, index: str, part: str, suffix: str,
                shapes: Shapes) -> list[Rename]:
    suffix = "weight" if suffix == "scale" else suffix  # RMSNorm scales are diffusers' norm weights
    if kind == "double_blocks":
        prefix = f"transformer_blocks.{index}."
        if part in _FLUX_QKV:
            return _split(key, shape, [(prefix + n + "." + suffix, shape[0] // 3) for n in _FLUX_QKV[part]])
        mapped = _FLUX_DOUBLE.get(part)
    else:
        prefix = f"single_transformer_blocks.{index}."
        if part == "linear1":
            # q, k, v of the hidden size (linear2's output width), then the MLP's input projection.
            linear2 = shapes.get(f"{kind}.{index}.linear2.weight")
            hidden = linear2[0] if linear2 else shapes[f"{kind}.{index}.linear1.weight"][1]
            names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
            sizes = [hidden, hidden, hidden, shape[0] - 3 * hidden]
            return _split(key, shape, [(prefix + n + "." + suffix, s) for n, s in zip(names, sizes)])
        mapped = _FLUX_SINGLE.get(part)
    return [Rename(prefix + mapped + "." + suffix, key)] if mapped else []


def _split(key: str, shape: tuple[int, ...], parts: list[tuple[str, int]]) -> list[Rename]:
    """``key``'s rows cut into consecutive ranges, one per ``(name, rows)``."""
    if sum(rows for _, rows in parts) != shape[0] or any(rows <= 0 for _, rows in parts):
        raise WeightsError(f"{key}: shape {shape} does not split into {[rows for _, rows in parts]} rows")
    out, start = [], 0
    for name, rows in parts:
        out.append(Rename(name, key, rows=(start, start + rows)))
        start += rows
    return out


# -- Wan ---------------------------------------------------------------------------------------

_WAN_BLOCK = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.")
_WAN_GLOBAL = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
_WAN_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj",
                  "v_img": "add_v_proj", "norm_q": "norm_q", "norm_k": "norm_k", "norm_k_img": "norm_added_k"}
_WAN_IN_BLOCK: dict[str, Callable[[str], str | None]] = {
    "self_attn": lambda rest: "attn1." + _WAN_ATTENTION[rest] if rest in _WAN_ATTENTION else None,
    "cross_attn": lambda rest: "attn2." + _WAN_ATTENTION[rest] if rest in _WAN_ATTENTION else None,
    "ffn": lambda rest: {"0": "ffn.net.0.proj", "2": "ffn.net.2"}.get(rest),
}
# Wan's cross-attention norm is its norm3 and the feed-forward's its norm2; diffusers swaps them.
_WAN_NORMS = {"norm2": "norm3", "norm3": "norm2"}
_WAN_KEY = re.compile(r"^blocks\.(\d+)\.([a-z_0-9]+)(?:\.(.+))?\.(weight|bias)$")


def _wan(shapes: Shapes) -> list[Rename]:
    out = []
    for key in shapes:
        if key == "head.modulation":
            out.append(Rename("scale_shift_table", key))
            continue
        stem, _, suffix = key.rpartition(".")
        if stem in _WAN_GLOBAL:
            out.append(Rename(f"{_WAN_GLOBAL[stem]}.{suffix}", key))
            continue
        block = re.match(r"^blocks\.(\d+)\.modulation$", key)
        if block:
            out.append(Rename(f"blocks.{block.group(1)}.scale_shift_table", key))
            continue
        match = _WAN_KEY.match(key)
        if not match:
            continue
        index, module, rest, suffix = match.groups()
        if module in _WAN_NORMS and rest is None:
            out.append(Rename(f"blocks.{index}.{_WAN_NORMS[module]}.{suffix}", key))
        elif module in _WAN_IN_BLOCK and rest is not None:
            mapped = _WAN_IN_BLOCK[module](rest)
            if mapped:
                out.append(Rename(f"blocks.{index}.{mapped}.{suffix}", key))
    return out
