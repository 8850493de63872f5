"""The layer-swap path beside vramfx.compile and eager on CPU, side by side in one process.

The workload of ``compile_cpu.py``: a ~0.8 GB Llama-like model (16 layers, hidden 1024, seq 128)
with weights on disk, page cache warm, everything at 25% of its weights. Four ways to run it:

- eager, all weights in memory;
- ``vramfx.compile`` at the budget;
- ``vramfx.swap`` synchronous: each module's weights read when it is called
  (``prefetch=False``), as the original layer-swap implementation does;
- ``vramfx.swap`` with prefetch along the recorded module order.

Both layer-swap runs keep the modules the planner chooses under the same limit. Calls are
interleaved (eager, compile, sync, prefetch, eager, ...) so all see the same machine state, and
the medians are compared.

    python benchmarks/swap_cpu.py [--layers 16] [--calls 7] [--budget-fraction 0.25] [--threads N] [--cold]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import vramfx
from workloads import llama_config, llama_on_disk, timed
from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management, swap_stats
from vramfx.util import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); fewer leave a core to the reader")
    parser.add_argument("--cold", action="store_true", help="read weights with O_DIRECT (page cache bypassed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = llama_config(args.layers)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "use_cache": False}
    module_map = {torch.nn.Linear: AutoWrappedLinear, LlamaRMSNorm: AutoWrappedModule, torch.nn.Embedding: AutoWrappedModule}
    vram_config = dict(offload_dtype="disk", offload_device="disk", computation_device="cpu")

    def empty() -> torch.nn.Module:
        with vramfx.skip_model_initialization():
            return LlamaModel(config).eval()

    with tempfile.TemporaryDirectory() as folder:
        eager, weights, weight_bytes = llama_on_disk(folder, args.layers)
        budget = int(weight_bytes * args.budget_fraction)
        runs = {
            "eager": eager,
            "compile": vramfx.compile(empty(), budget=budget, weights=weights, device="cpu", example_kwargs=kwargs,
                                      bypass_page_cache=args.cold),
            "swap_sync": enable_vram_management(empty(), module_map, vram_config, vram_limit=f"{budget}B",
                                                disk_map=weights, prefetch=False, bypass_page_cache=args.cold),
            "swap_prefetch": enable_vram_management(empty(), module_map, vram_config, vram_limit=f"{budget}B",
                                                    disk_map=weights, bypass_page_cache=args.cold),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.no_grad():
            expected = eager(**kwargs).last_hidden_state
            for name, model in runs.items():  # the first call records, plans and loads kept weights
                assert torch.equal(expected, model(**kwargs).last_hidden_state), f"{name} differs from eager"
            for _ in range(args.calls):
                for name, model in runs.items():
                    times[name].append(timed(lambda: model(**kwargs)))
        stats = {name: swap_stats(runs[name]) for name in ("swap_sync", "swap_prefetch")}
        plan = runs["compile"].plan

    medians = {name: statistics.median(t) for name, t in times.items()}
    figures = {
        "weights_bytes": weight_bytes,
        "budget_bytes": budget,
        **{f"{name}_seconds": s for name, s in medians.items()},
        **{f"{name}_ratio": s / medians["eager"] for name, s in medians.items()},
        "compile_streamed_bytes": plan.streamed_bytes,
        **{f"{name}_fetched_bytes": st.fetched_bytes for name, st in stats.items()},
        **{f"{name}_resident_bytes": st.resident_bytes for name, st in stats.items()},
        **{f"{name}_wait_seconds": st.wait_seconds for name, st in stats.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"model          {args.layers} layers, hidden 1024, seq {args.seq}: {format_bytes(weight_bytes)} of weights on disk")
    print(f"budget         {format_bytes(budget)} ({args.budget_fraction:.0%} of weights), medians of {args.calls} calls, "
          f"{torch.get_num_threads()} torch threads, {'O_DIRECT reads' if args.cold else 'page cache warm'}")
    print(f"eager          {medians['eager'] * 1e3:8.1f} ms   1.000x   all weights in RAM")
    print(f"compile        {medians['compile'] * 1e3:8.1f} ms   {figures['compile_ratio']:.3f}x   "
          f"streams {format_bytes(plan.streamed_bytes)} per call")
    for name, label in (("swap_sync", "swap sync"), ("swap_prefetch", "swap prefetch")):
        st = stats[name]
        print(f"{label:<14} {medians[name] * 1e3:8.1f} ms   {figures[name + '_ratio']:.3f}x   "
              f"streams {format_bytes(st.fetched_bytes)} per call, keeps {format_bytes(st.resident_bytes)}, "
              f"waits {st.wait_seconds * 1e3:.1f} ms for weights (last call)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
