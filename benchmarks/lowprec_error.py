"""How far low-precision storage moves outputs from full precision, measured on compiled models.

For each model, the float32 eager output is the reference. Each row compiles the model with a
storage dtype, a compute dtype and a keep list, runs it, and compares: relative L2 error
``|y - y_ref| / |y_ref|``, the largest absolute difference, and cosine similarity. The Flux rows
also run a short denoising loop (FluxPipeline, 4 steps, with a tiny VAE in the compute dtype) and
give the image's PSNR against the float32 image, since errors compound over the steps.

Weights are random (seeded), not trained: trained weights have other ranges and outliers, so
these figures show the mechanism and orders of magnitude, not the quality of a real checkpoint.

    python benchmarks/lowprec_error.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

import vramfx

FP8 = torch.float8_e4m3fn
ROWS = [
    # (storage, compute, keep)
    (None, torch.bfloat16, "auto"),  # bf16 compute alone: the floor every bf16 row shares
    (torch.bfloat16, torch.float32, "auto"),
    (torch.float16, torch.float32, "auto"),
    (FP8, torch.float32, "auto"),
    (FP8, torch.float32, "minimal"),
    (FP8, torch.float32, None),
    (torch.float8_e5m2, torch.float32, "auto"),
    (FP8, torch.bfloat16, "auto"),
    (torch.float8_e5m2, torch.bfloat16, "auto"),
]


def llama_config_model():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=8))


def flux_model():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))


def flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 64, 16, generator=g), "encoder_hidden_states": torch.randn(1, 16, 64, generator=g),
            "pooled_projections": torch.randn(1, 64, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(16, 3), "return_dict": False}


def llama_inputs() -> dict[str, Any]:
    return {"input_ids": torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(1)), "use_cache": False}


def first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def in_dtype(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def errors(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    a, e = actual.double().flatten(), expected.double().flatten()
    return {
        "rel_l2": float((a - e).norm() / e.norm()),
        "max_abs": float((a - e).abs().max()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, e, dim=0)),
    }


def flux_image(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A 4-step FluxPipeline run with a tiny VAE, both in ``dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                        scaling_factor=1.5).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    vae.to(dtype)  # the pipeline decodes latents in the transformer's dtype
    image = pipe(prompt_embeds=torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3)).to(dtype),
                 pooled_prompt_embeds=torch.randn(1, 64, generator=torch.Generator().manual_seed(4)).to(dtype),
                 height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    return image.float()


def psnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    mse = float(((actual - expected) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(name: str, build, inputs: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    eager = build().eval()
    eager.save_pretrained(folder)
    with torch.no_grad():
        expected = first_tensor(eager(**inputs))
    image32 = flux_image(eager, torch.float32) if name == "flux" else None
    weights = vramfx.DiskMap(folder)
    rows = []
    for storage, compute, keep in ROWS:
        with vramfx.skip_model_initialization():
            empty = build().eval()
        fast = vramfx.compile(empty, budget=10 * weights.nbytes + 2**30, weights=weights, device="cpu",
                              storage_dtype=storage, compute_dtype=compute, keep_in_compute_dtype=keep)
        actual = first_tensor(fast(**in_dtype(inputs, compute)))
        plan = fast.plan
        row = {
            "model": name,
            "storage": str(storage or compute).removeprefix("torch."),
            "compute": str(compute).removeprefix("torch."),
            "keep": str(keep),
            "stored_fraction": plan.weight_bytes / weights.nbytes,
            **errors(actual, expected),
        }
        if image32 is not None:
            row["image_psnr_db"] = psnr(flux_image(fast, compute), image32)
        rows.append(row)
    return rows


def keep_shares() -> list[tuple[str, str, float, float]]:
    """For full-size configs built on meta: the share of parameters each preset keeps, and the
    bytes stored with fp8 storage and bf16 compute as a fraction of bf16."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from vramfx.precision import keep_items, kept_names

    with vramfx.skip_model_initialization():
        models = {
            "Flux.1-dev 12B": FluxTransformer2DModel(guidance_embeds=True),
            "Wan2.1 14B": WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                                ffn_dim=13824, num_layers=40),
            "Llama-3 8B": LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                       num_attention_heads=32, num_key_value_heads=8,
                                                       vocab_size=128256, tie_word_embeddings=False)),
        }
    rows = []
    for name, model in models.items():
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        total = sum(sizes.values())
        for preset in ("auto", "minimal"):
            kept = sum(v for n, v in sizes.items() if n in kept_names(model, keep_items(preset)))
            rows.append((name, preset, kept / total, (total - kept + 2 * kept) / (2 * total)))
    return rows


def weight_rounding() -> list[tuple[float, str, float]]:
    """Relative L2 error of rounding normal weights of a few scales to each storage dtype."""
    rows = []
    for std in (0.02, 1.0):
        w = torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * std
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16):
            rounded = w.to(dtype).float()
            rows.append((std, str(dtype).removeprefix("torch."), float((rounded - w).norm() / w.norm())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows += measure("llama", llama_config_model, llama_inputs(), Path(folder) / "llama")
        rows += measure("flux", flux_model, flux_inputs(), Path(folder) / "flux")
    print(f"{'model':6} {'storage':14} {'compute':9} {'keep':8} {'bytes':>6} {'rel L2':>9} {'max abs':>9} "
          f"{'cosine':>10} {'image PSNR':>11}")
    for r in rows:
        image = f"{r['image_psnr_db']:8.1f} dB" if "image_psnr_db" in r else ""
        print(f"{r['model']:6} {r['storage']:14} {r['compute']:9} {r['keep']:8} {r['stored_fraction']:6.3f} "
              f"{r['rel_l2']:9.2e} {r['max_abs']:9.2e} {r['cosine']:10.6f} {image:>11}")
    print("bytes: stored weight bytes as a fraction of the float32 checkpoint; errors against float32 eager.")
    print()
    print("weights ~ N(0, std^2) rounded to the storage dtype, relative L2 error:")
    for std, dtype, err in weight_rounding():
        print(f"  std {std:<5} {dtype:14} {err:.2e}")
    print()
    print(f"{'full-size config (meta)':24} {'keep':8} {'params kept':>11} {'fp8 bytes / bf16 bytes':>23}")
    for name, preset, kept, ratio in keep_shares():
        print(f"{name:24} {preset:8} {kept:11.1%} {ratio:23.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
