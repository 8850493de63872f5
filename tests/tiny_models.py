"""Tiny configs of real transformers and diffusers architectures, with example inputs.

Every test that needs "a real model" takes it from here, so the suite exercises the same eight
architectures everywhere. Models are built with random weights (seeded) and saved with
``save_pretrained`` into a temporary folder, as a hub checkpoint would be laid out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vramfx


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and call it."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _t5_encoder() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              image_size=32, patch_size=8))


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128))


def _unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )


def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )


def _vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    )


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _llama, lambda: {"input_ids": torch.randint(0, 128, (1, 8), generator=_generator()),
                                       "use_cache": False}),
        Arch("t5_encoder", _t5_encoder, lambda: {"input_ids": torch.randint(0, 128, (1, 8), generator=_generator())}),
        Arch("vit", _vit, lambda: {"pixel_values": torch.randn(1, 3, 32, 32, generator=_generator())}),
        Arch("bert", _bert, lambda: {"input_ids": torch.randint(0, 128, (1, 8), generator=_generator())}),
        Arch("unet", _unet, lambda: {"sample": torch.randn(1, 4, 16, 16, generator=_generator()),
                                     "timestep": torch.tensor([10]),
                                     "encoder_hidden_states": torch.randn(1, 7, 32, generator=_generator())}),
        Arch("flux", _flux, lambda: {"hidden_states": torch.randn(1, 16, 16, generator=_generator()),
                                     "encoder_hidden_states": torch.randn(1, 8, 32, generator=_generator()),
                                     "pooled_projections": torch.randn(1, 32, generator=_generator()),
                                     "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(16, 3),
                                     "txt_ids": torch.zeros(8, 3), "return_dict": False}),
        Arch("wan", _wan, lambda: {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=_generator()),
                                   "timestep": torch.tensor([10]),
                                   "encoder_hidden_states": torch.randn(1, 8, 32, generator=_generator())}),
        Arch("autoencoder_kl", _vae, lambda: {"sample": torch.randn(1, 3, 32, 32, generator=_generator())}),
    ]
}


def build_saved(arch: Arch, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Build ``arch`` with seeded random weights, save it to ``folder``, return it in eval mode."""
    torch.manual_seed(seed)
    model = arch.build().eval()
    model.save_pretrained(folder)
    return model


def build_empty(arch: Arch) -> torch.nn.Module:
    """The same architecture with meta parameters and no init work."""
    with vramfx.skip_model_initialization():
        return arch.build().eval()


def assert_same_output(expected: object, actual: object) -> None:
    """Same output type and structure, tensors equal bit for bit."""
    from torch.utils import _pytree as pytree

    assert type(actual) is type(expected)
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    assert exp_spec == act_spec
    for e, a in zip(exp_leaves, act_leaves):
        if isinstance(e, torch.Tensor):
            assert torch.equal(e, a), "output differs from eager"
        else:
            assert e == a


def minimum_budget(model: torch.nn.Module, weights: object, inputs: dict[str, Any], **kwargs: Any) -> int:
    """The smallest budget vramfx can plan this model and call with (from its BudgetError)."""
    try:
        vramfx.compile(model, budget=1, weights=weights, device="cpu", example_kwargs=inputs, **kwargs)
    except vramfx.BudgetError as exc:
        return exc.minimum_bytes
    raise AssertionError("a 1-byte budget was accepted")


def streaming_budget(model: torch.nn.Module, weights: object, inputs: dict[str, Any], **kwargs: Any) -> int:
    """A budget that holds about a quarter of the weights beyond the minimum: most of them stream."""
    weight_bytes = sum(weights.info(k).nbytes for k in weights) if hasattr(weights, "info") else 0
    return minimum_budget(model, weights, inputs, **kwargs) + weight_bytes // 4


def further_graph_bytes(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """The host memory compile sets aside for a graph of this call captured after another one:
    what a budget needs beyond one signature's for each further signature."""
    from vramfx.capture import capture
    from vramfx.compiler import graph_host_bytes

    return graph_host_bytes(capture(model, (), inputs), torch.device("cpu"), first=False)
