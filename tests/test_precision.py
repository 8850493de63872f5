"""The low-precision policy: which weights are stored low, argument checks, exact widenings."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, build_empty
from vramfx.capture import capture
from vramfx.precision import (
    STORAGE_DTYPES,
    exactly_widens,
    keep_items,
    kept_names,
    precision_from_arguments,
    storage_dtypes,
)

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte dtype, as that dtype."""
    bits = {1: torch.uint8, 2: torch.int16}[dtype.itemsize]
    count = 2 ** (8 * dtype.itemsize)
    return torch.arange(count, dtype=torch.int32).to(bits).view(dtype)


@pytest.mark.parametrize("source", [*FP8, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", [*FP8, torch.bfloat16, torch.float16, torch.float32])
def test_exact_widenings_are_exact_over_every_value(source, target):
    values = every_value(source)
    finite = values[~torch.isnan(values.float())]
    back = finite.to(target).to(source)
    lossless = bool(torch.equal(back.float(), finite.float()))
    assert exactly_widens(source, target) == lossless


def test_a_lossy_pair_is_never_called_exact():
    assert not exactly_widens(torch.float16, torch.bfloat16)
    assert not exactly_widens(torch.bfloat16, torch.float16)
    assert not exactly_widens(torch.float32, torch.float8_e4m3fn)
    assert not exactly_widens(torch.float8_e4m3fn, torch.float8_e5m2)


def flux_kept(preset) -> set[str]:
    return kept_names(build_empty(ARCHS["flux"]), keep_items(preset))


def test_auto_keeps_norms_embeddings_biases_and_modulation_of_flux():
    kept = flux_kept("auto")
    for name in ("x_embedder.weight", "context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                 "transformer_blocks.0.norm1.linear.weight", "transformer_blocks.0.attn.norm_q.weight",
                 "transformer_blocks.0.attn.to_q.bias", "norm_out.linear.weight", "proj_out.weight"):
        assert name in kept, name
    for name in ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.ff.net.0.proj.weight",
                 "single_transformer_blocks.0.proj_mlp.weight", "single_transformer_blocks.0.proj_out.weight"):
        assert name not in kept, name


def test_minimal_stores_modulation_layers_low_but_keeps_norms_and_embeddings():
    kept = flux_kept("minimal")
    assert "transformer_blocks.0.norm1.linear.weight" not in kept
    assert "proj_out.weight" not in kept
    assert {"x_embedder.weight", "transformer_blocks.0.attn.norm_q.weight", "proj_out.bias"} <= kept


def test_auto_keeps_token_embeddings_and_the_lm_head_of_a_language_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    with vramfx.skip_model_initialization():
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    kept = kept_names(lm, keep_items("auto"))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= kept
    assert "model.layers.0.mlp.up_proj.weight" not in kept
    assert "lm_head.weight" not in kept_names(lm, keep_items("minimal"))


class Named(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(8, 4)  # an embedding whose name does not say so
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        self.head = torch.nn.Linear(4, 4)
        self.blocks[1].weight = self.head.weight  # tied: one tensor, two names


def test_user_names_globs_and_classes_select_weights_and_their_tied_twins():
    model = Named()
    assert kept_names(model, ("head",)) == {"head.weight", "head.bias", "blocks.1.weight"}
    assert kept_names(model, ("blocks.0.weight",)) == {"blocks.0.weight"}
    assert kept_names(model, ("blocks.*.bias",)) == {"blocks.0.bias", "blocks.1.bias"}
    assert kept_names(model, (torch.nn.Embedding,)) == {"table.weight"}
    assert "table.weight" in kept_names(model, ("minimal",))
    assert kept_names(model, ()) == set()


def test_storage_dtypes_lower_only_floating_parameters_outside_the_keep_list():
    model = build_empty(ARCHS["llama"])
    captured = capture(model, (), ARCHS["llama"].inputs(), dtype=torch.bfloat16)
    precision = precision_from_arguments(torch.float8_e4m3fn, torch.bfloat16, "auto")
    stored = storage_dtypes(model, captured.weights, precision)
    assert stored["layers.0.self_attn.q_proj.weight"] == torch.float8_e4m3fn
    assert stored["embed_tokens.weight"] == torch.bfloat16
    assert stored["layers.0.input_layernorm.weight"] == torch.bfloat16
    assert stored["rotary_emb.inv_freq"] == torch.bfloat16  # a buffer: never stored low


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"storage_dtype": torch.int8}, "storage_dtype must be one of"),
        ({"storage_dtype": "fp8"}, "storage_dtype must be one of"),
        ({"compute_dtype": torch.float8_e4m3fn}, "compute_dtype must be one of"),
        ({"storage_dtype": torch.float32, "compute_dtype": torch.bfloat16}, "storage_dtype float32 is wider"),
        ({"storage_dtype": torch.bfloat16, "keep_in_compute_dtype": [3]}, "keep_in_compute_dtype takes"),
        ({"storage_dtype": torch.bfloat16, "keep_in_compute_dtype": int}, "keep_in_compute_dtype takes"),
    ],
)
def test_compile_checks_precision_arguments_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vramfx.compile(torch.nn.Linear(2, 2), budget="1MiB", device="cpu", **kwargs)


def test_no_dtype_means_no_precision_policy():
    assert precision_from_arguments(None, None, "auto") is None
    assert all(d in STORAGE_DTYPES for d in FP8)
