"""A workload for ``vramfx plan``: Wan 2.1 14B text-to-video, built empty, at 480p and 81 frames.

    vramfx plan examples/plan_wan.py:wan_14b --budget 8GB --device cuda

The transformer is built from its published configuration with meta parameters (no memory, no
weights); the inputs are meta tensors of the shapes one denoising step sees: 81 frames of
480×832 become 21×60×104 latents, and the prompt is 512 tokens of the 4096-wide text encoder.
"""

import torch

import vramfx


def wan_14b():
    from diffusers import WanTransformer3DModel

    with vramfx.skip_model_initialization():
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
    # bf16, except the modules the checkpoint keeps in float32, as from_pretrained(torch_dtype=bf16) loads it.
    keep = set(model._keep_in_fp32_modules or ())
    for name, param in model.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(torch.bfloat16)
    inputs = {
        "hidden_states": torch.empty(1, 16, 21, 60, 104, dtype=torch.bfloat16, device="meta"),
        "timestep": torch.empty(1, dtype=torch.long, device="meta"),
        "encoder_hidden_states": torch.empty(1, 512, 4096, dtype=torch.bfloat16, device="meta"),
        "return_dict": False,
    }
    return model, (), inputs
