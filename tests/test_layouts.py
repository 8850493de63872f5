"""Community layouts → model names, checked against the converters the community itself uses.

Flux and Wan: diffusers' own single-file converters (``convert_*_to_diffusers``) run on the same
original-layout state dict; every tensor vramfx serves must equal theirs, row for row (each
stored row carries a distinct value). Llama: the gguf package's own name table
(``TensorNameMap``) names the file.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import ARCHS
from vramfx.errors import WeightsError
from vramfx.storage.host import HostSource
from vramfx.storage.layouts import COMFY_PREFIX, apply_renames, community_renames
from vramfx.storage.views import ViewSource, stored_view

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")


def _labelled(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One tensor per name whose every row holds a value no other row of any tensor holds."""
    out, base = {}, 0
    for name, shape in shapes.items():
        rows = shape[0]
        values = torch.arange(base, base + rows, dtype=torch.float64).view(rows, *([1] * (len(shape) - 1)))
        out[name] = values.expand(shape).contiguous()
        base += rows
    return out


def _served(state: dict[str, torch.Tensor], metadata=None) -> ViewSource:
    host = HostSource(state)
    views = {k: stored_view(k, host.info(k)) for k in host}
    return ViewSource(host, apply_renames(views, community_renames({k: tuple(v.shape) for k, v in state.items()},
                                                                      metadata)))


def _flux_bfl_shapes(hidden: int = 3072, mlp: int = 12288) -> dict[str, tuple[int, ...]]:
    """BFL's Flux layout, one double and one single block. diffusers' converter assumes Flux's
    width (3072) when it splits ``linear1``; other dimensions are kept small."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, rows: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = (rows, 2), (rows,)

    for name in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                 "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear"):
        linear(name, 4)
    linear("final_layer.adaLN_modulation.1", 6)
    d = "double_blocks.0."
    for name in ("img_mod.lin", "txt_mod.lin", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2",
                 "img_attn.proj", "txt_attn.proj"):
        linear(d + name, 4)
    linear(d + "img_attn.qkv", 9)
    linear(d + "txt_attn.qkv", 9)
    for norm in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                 "txt_attn.norm.key_norm"):
        shapes[d + norm + ".scale"] = (3,)
    s = "single_blocks.0."
    linear(s + "modulation.lin", 4)
    linear(s + "linear1", 3 * hidden + mlp)
    linear(s + "linear2", hidden)
    shapes[s + "norm.query_norm.scale"] = shapes[s + "norm.key_norm.scale"] = (3,)
    return shapes


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_flux_bfl_layout_equals_diffusers_converter(prefix):
    state = {prefix + k: v for k, v in _labelled(_flux_bfl_shapes()).items()}
    expected = single_file.convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    served = _served(state)
    assert sorted(served) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name


def test_flux_names_are_the_diffusers_model_names():
    model_names = set(ARCHS["flux"].build().state_dict())
    served = {r.name for r in community_renames(_flux_bfl_shapes(32, 128))}
    assert {n for n in model_names if "guidance" not in n} <= served


def _wan_original_shapes(num_layers: int = 2) -> dict[str, tuple[int, ...]]:
    """The original Wan layout of the tiny Wan in tiny_models (dims 32, ffn 64)."""
    shapes: dict[str, tuple[int, ...]] = {"patch_embedding.weight": (32, 4, 1, 2, 2), "patch_embedding.bias": (32,),
                                          "head.modulation": (1, 2, 32), "head.head.weight": (16, 32),
                                          "head.head.bias": (16,)}
    for name, rows in (("text_embedding.0", 32), ("text_embedding.2", 32), ("time_embedding.0", 32),
                       ("time_embedding.2", 32), ("time_projection.1", 192)):
        shapes[name + ".weight"], shapes[name + ".bias"] = (rows, 32), (rows,)
    for i in range(num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, 32)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"], shapes[f"{b}{attn}.{proj}.bias"] = (32, 32), (32,)
            shapes[f"{b}{attn}.norm_q.weight"] = shapes[f"{b}{attn}.norm_k.weight"] = (32,)
        shapes[b + "norm3.weight"] = shapes[b + "norm3.bias"] = (32,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (64, 32), (64,)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (32, 64), (32,)
    return shapes


def test_wan_layout_equals_diffusers_converter_and_the_model():
    state = _labelled(_wan_original_shapes())
    expected = single_file.convert_wan_transformer_to_diffusers(dict(state))
    served = _served(state)
    assert sorted(served) == sorted(expected) == sorted(ARCHS["wan"].build().state_dict())
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name


def test_llama_cpp_names_are_the_gguf_package_names():
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    stored = {table.get_name(n, try_suffixes=(".weight", ".bias")): n for n in model.state_dict()}
    renames = community_renames({k: (4, 4) for k in stored}, {"general.architecture": "llama",
                                                             "llama.attention.head_count": 2,
                                                             "llama.attention.head_count_kv": 1})
    assert {r.key: r.name for r in renames} == stored
    orders = {r.name: (r.order.kind, r.order.heads) for r in renames if r.order}
    assert orders == {f"model.layers.{i}.self_attn.{p}_proj.weight": ("rope_halves", h)
                      for i in range(2) for p, h in (("q", 2), ("k", 1))}


def test_unknown_layouts_keep_their_names_and_bad_shapes_are_refused():
    assert community_renames({"encoder.layer.0.weight": (4, 4)}) == []
    assert community_renames({"blk.0.attn_q.weight": (4, 4)}, {"general.architecture": "qwen2"}) == []
    with pytest.raises(WeightsError, match="head_count"):
        community_renames({"blk.0.attn_q.weight": (4, 4)}, {"general.architecture": "llama"})
    shapes = _flux_bfl_shapes(32, 128)
    shapes["double_blocks.0.img_attn.qkv.weight"] = (8, 2)
    with pytest.raises(WeightsError, match="does not split"):
        community_renames(shapes)
