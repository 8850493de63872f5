"""vramfx.compile on CPU against eager, side by side in one process.

A ~0.8 GB Llama-like model (16 layers, hidden 1024, seq 128) with weights on disk, page cache
warm, compiled at 25% of its weights. Calls are interleaved (eager, vramfx, eager, …) so both see
the same machine state, and the medians are compared. Also prints capture + planning time for a
40-block model built on meta.

    python benchmarks/compile_cpu.py [--layers 16] [--calls 7] [--budget-fraction 0.25]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vramfx
from vramfx.capture import capture
from vramfx.plan.liveness import build_liveness
from vramfx.plan.schedule import schedule
from vramfx.util import format_bytes
from workloads import llama_config, llama_on_disk, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--plan-blocks", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from transformers import LlamaModel

    config = llama_config(args.layers)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        eager, weights, weight_bytes = llama_on_disk(folder, args.layers)
        budget = int(weight_bytes * args.budget_fraction)
        with vramfx.skip_model_initialization():
            empty = LlamaModel(config).eval()
        kwargs = {"input_ids": ids, "use_cache": False}
        start = time.perf_counter()
        fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", example_kwargs=kwargs)
        compile_seconds = time.perf_counter() - start

        with torch.no_grad():
            expected = eager(**kwargs).last_hidden_state
            assert torch.equal(expected, fast(**kwargs).last_hidden_state), "compiled output differs from eager"
            eager_times, fast_times = [], []
            for _ in range(args.calls):
                eager_times.append(timed(lambda: eager(**kwargs)))
                fast_times.append(timed(lambda: fast(**kwargs)))
        plan = fast.plan
        del eager
        gc.collect()

    plan_seconds = plan_time(args.plan_blocks, args.seq)
    eager_median, fast_median = statistics.median(eager_times), statistics.median(fast_times)
    figures = {
        "weights_bytes": weight_bytes,
        "budget_bytes": budget,
        "streamed_bytes_per_call": plan.streamed_bytes,
        "resident_bytes": plan.resident_bytes,
        "arena_bytes": plan.arena_bytes,
        "eager_seconds": eager_median,
        "vramfx_seconds": fast_median,
        "time_ratio": fast_median / eager_median,
        "streamed_ratio": plan.streamed_bytes / max(1, weight_bytes - budget),
        "predicted_seconds": plan.predicted.seconds_per_call,
        "compile_seconds": compile_seconds,
        f"capture_and_plan_seconds_{args.plan_blocks}_blocks": plan_seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"model        {args.layers} layers, hidden 1024, seq {args.seq}: {format_bytes(weight_bytes)} of weights on disk")
    print(f"budget       {format_bytes(budget)} ({args.budget_fraction:.0%} of weights)")
    print(f"plan         resident {format_bytes(plan.resident_bytes)}, arena {format_bytes(plan.arena_bytes)}, "
          f"streamed {format_bytes(plan.streamed_bytes)} per call")
    print(f"eager        {eager_median * 1e3:8.1f} ms per call (median of {args.calls}, all weights in RAM)")
    print(f"vramfx       {fast_median * 1e3:8.1f} ms per call (predicted {plan.predicted.seconds_per_call * 1e3:.1f} ms)")
    print(f"time ratio   {figures['time_ratio']:.3f}x eager            (goal <= 1.10)")
    print(f"streamed     {figures['streamed_ratio']:.3f}x (weights - budget) (goal <= 1.15)")
    print(f"compile      {compile_seconds:.2f} s for {args.layers} layers (capture, liveness, schedule, rewrite)")
    print(f"capture+plan {plan_seconds:.2f} s for a {args.plan_blocks}-block model on meta")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def plan_time(blocks: int, seq: int) -> float:
    """Capture and plan a ``blocks``-layer model built on meta: the cost a user pays once per shape."""
    from transformers import LlamaModel

    with vramfx.skip_model_initialization():
        model = LlamaModel(llama_config(blocks)).eval()
    ids = torch.zeros(1, seq, dtype=torch.long)
    start = time.perf_counter()
    captured = capture(model, (), {"input_ids": ids, "use_cache": False})
    live = build_liveness(captured)
    schedule(live, live.weight_bytes // 4, cost_model=vramfx.CostModel.for_device("cpu"), calls=10)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
