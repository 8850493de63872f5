"""fp8 storage against bf16 storage on CPU: bytes moved per call and time, side by side in one run.

A Llama-like model (hidden 1024, seq 128) computes in bfloat16. Its checkpoint is converted once
with ``vramfx.convert`` to bf16 and to fp8 (e4m3, keep list "auto"), and each is compiled under
the same budget (a quarter of the bf16 weights); fp8 also at half that budget. Calls are
interleaved (eager, then each variant, repeated) so all see the same machine state, and medians
are compared. The fp8 rows pay a cast per weight use: on CPU it is an elementwise pass, timed
here as the difference it makes.

    python benchmarks/lowprec_cpu.py [--layers 12] [--calls 5] [--budget-fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vramfx
from vramfx.util import format_bytes
from workloads import llama_config, timed  # the same model and timer as the compile benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from transformers import LlamaModel

    config = llama_config(args.layers)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    call = {"input_ids": ids, "use_cache": False}
    bf16 = torch.bfloat16
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        eager = LlamaModel(config).eval()
        eager.save_pretrained(folder / "fp32", max_shard_size="400MB")
        eager.to(bf16)
        eager_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        with vramfx.skip_model_initialization():
            empty = LlamaModel(config).eval()
        start = time.perf_counter()
        stored = {
            "bf16": vramfx.DiskMap(vramfx.convert(folder / "fp32", folder / "bf16", dtype=bf16, model=empty)),
            "fp8": vramfx.DiskMap(
                vramfx.convert(folder / "fp32", folder / "fp8", dtype=torch.float8_e4m3fn, model=empty)),
        }
        convert_seconds = time.perf_counter() - start
        for weights in stored.values():  # warm the page cache: this benchmark measures the warm case
            for key in weights:
                weights[key]
        budget = int(stored["bf16"].nbytes * args.budget_fraction)
        variants = {
            "bf16 storage": (stored["bf16"], budget, {"storage_dtype": bf16}),
            "fp8 storage": (stored["fp8"], budget, {"storage_dtype": torch.float8_e4m3fn}),
            "fp8, half budget": (stored["fp8"], budget // 2, {"storage_dtype": torch.float8_e4m3fn}),
        }
        compiled = {
            name: vramfx.compile(empty, budget=b, weights=w, device="cpu", compute_dtype=bf16, example_kwargs=call,
                                 **options)
            for name, (w, b, options) in variants.items()
        }
        times: dict[str, list[float]] = {"eager bf16": [], **{name: [] for name in compiled}}
        with torch.no_grad():
            for fast in compiled.values():
                fast(**call)  # loads the resident weights
            for _ in range(args.calls):
                times["eager bf16"].append(timed(lambda: eager(**call)))
                for name, fast in compiled.items():
                    times[name].append(timed(lambda: fast(**call)))

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["bf16 storage"]
    print(f"model    {args.layers} layers, hidden 1024, seq {args.seq}, compute bfloat16; "
          f"checkpoint converted to bf16 and fp8 in {convert_seconds:.1f} s")
    print(f"{'':18} {'budget':>10} {'stored':>10} {'resident':>10} {'streamed':>10} {'casts':>6} "
          f"{'cast bytes':>11} {'ms/call':>8} {'vs bf16':>8}")
    print(f"{'eager bf16':18} {'':>10} {format_bytes(eager_bytes):>10} {'all':>10} {'':>10} {'':>6} {'':>11} "
          f"{median['eager bf16'] * 1e3:8.1f} {median['eager bf16'] / base:8.3f}")
    figures = {"median_seconds": median, "budget_bytes": budget}
    for name, fast in compiled.items():
        plan = fast.plan
        print(f"{name:18} {format_bytes(plan.budget_bytes):>10} {format_bytes(plan.weight_bytes):>10} "
              f"{format_bytes(plan.resident_bytes):>10} {format_bytes(plan.streamed_bytes):>10} "
              f"{len(plan.casts):>6} {format_bytes(plan.cast_bytes):>11} {median[name] * 1e3:8.1f} "
              f"{median[name] / base:8.3f}")
        figures[name] = {"streamed_bytes": plan.streamed_bytes, "resident_bytes": plan.resident_bytes,
                         "weight_bytes": plan.weight_bytes, "casts": len(plan.casts), "cast_bytes": plan.cast_bytes}
    print(f"medians of {args.calls} interleaved calls; streamed = bytes moved per call; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
