"""Tiny diffusers pipelines (Flux, Wan) saved as a hub folder would be, nothing downloaded.

Each builder makes every component from a tiny config with seeded random weights, builds its
tokenizers locally from a small word-level vocabulary, and saves the whole pipeline with
``save_pretrained`` under ``root`` (``model_index.json`` plus one folder per component). The
calls are small enough that a whole generation takes well under a second on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ["a", "cat", "dog", "on", "the", "moon", "red", "blue", "photo", "of", "in", "space"]


def clip_tokenizer(folder: Path) -> Any:
    """A ``CLIPTokenizer`` from a tiny BPE vocabulary written to ``folder``."""
    import json

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in WORDS for c in w})
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def t5_tokenizer() -> Any:
    """A T5 tokenizer over a unigram vocabulary of :data:`WORDS` (no sentencepiece file needed)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *(("\u2581" + w, -1.0) for w in WORDS)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=32)


def save_flux(root: Path, seed: int = 0, *, scale: int = 1) -> Path:
    """A tiny FluxPipeline (CLIP and T5 text encoders, transformer, VAE) saved under ``root``;
    ``scale`` multiplies every width and the transformer's depth (benchmarks use a larger one)."""
    s = scale
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = clip_tokenizer(root / "_clip_vocab")
    t5 = t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip), hidden_size=32 * s, intermediate_size=64 * s, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32 * s, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5), d_model=32 * s, d_kv=8 * s, d_ff=64 * s, num_layers=2, num_heads=4,
    )).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=s, num_single_layers=s, attention_head_dim=16 * s,
        num_attention_heads=2, joint_attention_dim=32 * s, pooled_projection_dim=32 * s,
        axes_dims_rope=(4 * s, 6 * s, 6 * s),
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16 * s, 32 * s), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32 * s,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=clip,
        text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer,
    )
    pipe.save_pretrained(root)
    return root


#: The call both eager and compiled Flux pipelines are compared on.
FLUX_CALL = dict(prompt="a photo of a cat on the moon", height=32, width=32, num_inference_steps=3,
                 guidance_scale=3.5, max_sequence_length=8, output_type="pt")


def save_wan(root: Path, seed: int = 0) -> Path:
    """A tiny WanPipeline (umT5 text encoder, transformer, video VAE) saved under ``root``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    )).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 0.9, 1.1, 2.0]).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    pipe.save_pretrained(root)
    return root


#: The call both eager and compiled Wan pipelines are compared on.
WAN_CALL = dict(prompt="a red dog in space", negative_prompt="blue", height=16, width=16, num_frames=5,
                num_inference_steps=2, guidance_scale=5.0, max_sequence_length=8, output_type="pt")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eager_pipeline(cls: type, root: Path) -> Any:
    """``cls.from_pretrained(root)`` with every weight moved into fresh memory.

    ``from_pretrained`` may leave tensors where the safetensors file put them (8-byte aligned),
    and some CPU kernels round differently on such memory; vramfx's arenas are aligned as torch's
    own allocations are, so the reference is taken with weights in torch's own memory.
    """
    pipe = cls.from_pretrained(str(root))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    return pipe


def output_of(result: Any) -> torch.Tensor:
    """The images or frames a pipeline call returned."""
    return result.images if hasattr(result, "images") else result.frames
