"""The budget with fp8 storage: a quarter of what fp32 storage needs for weights, plus the upcasts.

A Llama-like model (hidden 1024, computing in float32) is planned with its weights stored in
float32 and in fp8 (e4m3): the minimum budget of each, its parts (weights, activations, the upcast
buffers fp8 adds, workspace and margin), and then both run: fp32 storage at a streaming budget
``B`` (the minimum plus a quarter of the weights), fp8 storage at ``(B - fixed) / 4 + fixed +
upcast`` where ``fixed`` is activations, workspace and margin. RssAnon growth over three calls is
measured for each, against its budget, after one eager call has warmed torch's CPU kernels (their
first call keeps some memory for the life of the process, outside any plan).

    python benchmarks/lowprec_budget.py [--layers 8] [--keep none]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import vramfx
from vramfx.capture import capture
from vramfx.compiler import DEFAULT_MARGIN_BYTES, compile_margin_bytes
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.plan.liveness import build_liveness
from vramfx.plan.schedule import minimum_budget, planned_casts
from vramfx.precision import precision_from_arguments, storage_dtypes
from vramfx.util import format_bytes
from workloads import llama_config

FP8 = torch.float8_e4m3fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--keep", default="none", help="'none', 'auto' or 'minimal'")
    args = parser.parse_args()
    keep = None if args.keep == "none" else args.keep

    from transformers import LlamaModel

    config = llama_config(args.layers)
    call = {"input_ids": torch.randint(0, 8192, (1, args.seq), generator=torch.Generator().manual_seed(0)),
            "use_cache": False}
    with vramfx.skip_model_initialization():
        empty = LlamaModel(config).eval()
    captured = capture(empty, (), call)
    precision = precision_from_arguments(FP8, None, keep)
    lives = {
        "fp32": build_liveness(captured),
        "fp8": build_liveness(captured, storage_dtypes=storage_dtypes(empty, captured.weights, precision)),
    }
    # compile's CPU margin: the default, the graph's own host memory, the allocator's slack.
    margin = compile_margin_bytes(captured, lives["fp32"], torch.device("cpu"), DEFAULT_MARGIN_BYTES["cpu"])
    fixed = lives["fp32"].workspace_bytes + margin
    minimum = {k: minimum_budget(lv, margin_bytes=margin) for k, lv in lives.items()}
    upcast = planned_casts(lives["fp8"])[1]
    activations = lives["fp32"].activation_peak_bytes
    budget32 = minimum["fp32"] + lives["fp32"].weight_bytes // 4
    weight_share = budget32 - activations - fixed
    budget8 = weight_share // 4 + activations + fixed + upcast + 64 * len(lives["fp8"].weights)

    b = format_bytes
    print(f"model       {args.layers} layers, hidden 1024, seq {args.seq}, compute float32, keep={args.keep}")
    for k, lv in lives.items():
        print(f"{k:5} stored {b(lv.weight_bytes):>10}  minimum budget {b(minimum[k]):>10}  activations "
              f"{b(lv.activation_peak_bytes):>10}  workspace+margin {b(fixed):>10}")
    print(f"upcast region (fp8): {b(upcast)}, the largest weights in float32 alive at once")
    print(f"fp32 streaming budget B = {b(budget32)} (weight share {b(weight_share)})")
    print(f"fp8 budget (B - fixed)/4 + fixed + upcast = {b(budget8)}  ({budget8 / budget32:.3f} B)")

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        eager = LlamaModel(config).eval()
        eager.save_pretrained(folder / "fp32", max_shard_size="200MB")
        with torch.no_grad():  # torch's CPU kernels keep some memory from their first call on
            eager(**call)
        del eager
        release_freed_memory()
        fp8 = vramfx.convert(folder / "fp32", folder / "fp8", dtype=FP8, keep_in_compute_dtype=keep, model=empty)
        runs = {
            "fp32": (vramfx.DiskMap(folder / "fp32"), budget32, {}),
            "fp8": (vramfx.DiskMap(fp8), budget8, {"storage_dtype": FP8, "keep_in_compute_dtype": keep}),
        }
        for name, (weights, budget, options) in runs.items():
            fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=call, calls=3,
                                  **options)
            release_freed_memory()
            with PeakMemory("cpu") as peak:
                for _ in range(3):
                    fast(**call)
            plan = fast.plan
            print(f"{name:5} at {b(budget):>10}: planned peak {b(plan.peak_bytes):>10}, RssAnon growth "
                  f"{b(peak.growth_bytes):>10} ({peak.growth_bytes / budget:.2f} of budget); resident "
                  f"{b(plan.resident_bytes)}, streamed {b(plan.streamed_bytes)} per call")
            fast.release()
            del fast
            release_freed_memory()


if __name__ == "__main__":
    main()
