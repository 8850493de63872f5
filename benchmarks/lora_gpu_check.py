"""GPU check of LoRA on compiled models: outputs against eager PEFT on the same device.

On a machine with one CUDA GPU, from the repository root (a minute; needs diffusers and peft)::

    pip install --no-deps -e . && python benchmarks/lora_gpu_check.py

A tiny diffusers Flux transformer in float32 and bfloat16, weights saved to safetensors in a
temporary folder; eager on the GPU against ``vramfx.compile(..., device="cuda")`` at a budget
that streams most weights. Checked, with ``torch.equal``: a LoRA added before compile, weights
of two adapters, a scale change, a hot swap in place (``.data.copy_``, as PEFT writes it), an
adapter deleted and added again under the same name, a fused LoRA and unloading; and that value
changes made no new capture. The exit status is 1 if any check fails. ``--device cpu`` runs
the same checks on CPU (the tests do that part).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import vramfx

TARGETS = ["to_q", "to_k", "to_v", "proj_out"]


def build():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
    )


def inputs(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    made = {"hidden_states": torch.randn(1, 64, 16, generator=g), "encoder_hidden_states": torch.randn(1, 16, 64, generator=g),
            "pooled_projections": torch.randn(1, 64, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(16, 3)}
    out = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
           for k, v in made.items()}
    return {**out, "return_dict": False}


def add_lora(models, name: str, seed: int, r: int = 8) -> None:
    from peft import LoraConfig

    for model in models:
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False), adapter_name=name)
    values = {k: v.detach().cpu() for k, v in models[0].state_dict().items() if f".{name}." in k}
    for model in models[1:]:
        inner = model.model if isinstance(model, vramfx.CompiledModule) else model
        inner.load_state_dict(values, strict=False)


def check(device: torch.device, dtype: torch.dtype) -> list[str]:
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        eager = build().eval()
        eager.to(dtype).save_pretrained(folder)
        eager.to(device)
        with vramfx.skip_model_initialization():
            empty = build().eval().to(dtype)
        add_lora([eager, empty], "a", seed=1)
        weights = vramfx.DiskMap(folder)
        weight_bytes = sum(weights.info(k).nbytes for k in weights)
        x = inputs(device, dtype)
        try:
            vramfx.compile(empty, budget=1, weights=weights, device=device, example_kwargs=x)
        except vramfx.BudgetError as exc:
            # On CPU the budget also holds the host memory of every graph captured (one per structure).
            budget = exc.minimum_bytes + weight_bytes // 4 + (64 * 2**20 if device.type == "cpu" else 0)
        fast = vramfx.compile(empty, budget=budget, weights=weights, device=device)

        def same(what: str) -> None:
            with torch.no_grad():
                expected = eager(**x)[0]
            actual = fast(**x)[0]
            ok = torch.equal(expected, actual)
            print(f"{dtype}  {what:38s} {'equal' if ok else 'DIFFERS (max %.3g)' % (expected - actual).abs().max()}")
            if not ok:
                failures.append(f"{dtype} {what}")

        same("LoRA added before compile")
        add_lora([eager, fast], "b", seed=2)
        for m in (eager, fast):
            m.set_adapters(["a", "b"], [0.7, 0.4])
        same("two adapters with weights")
        graphs = len(fast.compiled_graphs)
        for m in (eager, fast):
            m.set_adapters(["a", "b"], [-1.25, 2.0])
        same("weights changed")
        torch.manual_seed(5)
        new = {n: torch.randn_like(p) for n, p in eager.named_parameters() if ".lora_B.a." in n}
        for m in (eager, fast.model):
            for n, p in m.named_parameters():
                if n in new:
                    p.data.copy_(new[n].to(p.device))
        same("hot swap in place")
        for m in (eager, fast):
            m.delete_adapters(["a"])
        add_lora([eager, fast], "a", seed=3)
        for m in (eager, fast):
            m.set_adapters(["a", "b"], [-1.25, 2.0])
        same("deleted and added again")
        if len(fast.compiled_graphs) != graphs:
            failures.append(f"{dtype} a value change made a new capture")
            print(f"{dtype}  value changes made a new capture")
        for m in (eager, fast):
            m.fuse_lora()
        same("fused")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        failures += check(device, dtype)
    print("all equal" if not failures else f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
