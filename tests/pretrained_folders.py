"""Model folders and pipeline roots as diffusers and transformers save them, from tiny configs.

Everything is built here, tokenizers included (from small vocabulary files written into the
folder): nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import ARCHS

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "blue"]


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters and a few words, max length 8."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab[word + "</w>"] = len(vocab)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def t5_tokenizer():
    """A unigram T5 tokenizer over a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((w, -1.0) for w in WORDS)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_flux_pipeline(root: Path, *, max_shard_size: str = "40KB"):
    """A whole FluxPipeline (tokenizers, CLIP and T5 encoders, VAE, the tiny Flux transformer) saved
    to ``root``, its models sharded with an index. Returns the pipeline, in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = ARCHS["flux"].build().eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    ).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=32)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(root / "_vocab"),
        text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer,
    )
    pipe.save_pretrained(root, max_shard_size=max_shard_size, safe_serialization=True)
    return pipe


def flux_image(pipe) -> torch.Tensor:
    """One 16x16 image from a prompt, three steps, seeded."""
    return pipe(
        prompt="a cat on the mat", height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
        max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_causal_lm(folder: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str = "2MB"):
    """A small LlamaForCausalLM (7 MB) with seeded weights, saved sharded in ``dtype``; returned in eval mode
    as transformers loads it back (``from_pretrained(folder, dtype=dtype)``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    return LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
