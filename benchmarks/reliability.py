"""Reliability figures for docs/reliability.md: failing calls, a forked child, the budget as RssAnon.

On the CPU Llama-like workload of ``compile_cpu.py`` (4 layers, weights on disk, page cache
warm, budget 30% of the weights):

- **failing calls**: after 20 warm-up calls, 100 calls where every tenth passes a token outside
  the vocabulary, so the graph raises at the embedding node, mid-call; the other 90 are compared
  with eager, and RssAnon is read after every tenth call;
- **fork**: the median of 10 calls in the parent (on its threads, and on one thread, as a forked
  child runs under OpenMP) against a forked child's first and second call (the child checks its
  output against eager);
- **budget**: RssAnon growth from before ``compile`` through 3 calls against the budget, each
  model in a fresh process that has paid torch.export's one-time state on a toy model first:
  this workload, and every architecture of the test suite at its minimum budget.

    python benchmarks/reliability.py [--layers 4] [--budget-fraction 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import vramfx
from workloads import llama_on_disk, timed
from vramfx.budget import rss_anon_bytes
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.util import format_bytes

ROOT = Path(__file__).resolve().parent.parent


def failing_calls(fast, inputs: dict, expected: torch.Tensor, calls: int = 100, warmup: int = 20) -> dict:
    """``warmup`` calls, then ``calls`` more, every tenth raising; RssAnon after each tenth."""
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 3] = 10**6
    rss, equal, raised = [], 0, 0
    for i in range(1, warmup + calls + 1):
        if i % 10 == 0:
            try:
                fast(**bad)
            except IndexError:
                raised += i > warmup
            if i >= warmup:
                gc.collect()
                rss.append(rss_anon_bytes())
        else:
            same = torch.equal(expected, fast(**inputs).last_hidden_state)
            equal += i > warmup and same
    return {"calls": calls, "equal_to_eager": equal, "raised": raised, "rss_after_each_tenth_call": rss,
            "rss_growth": rss[-1] - rss[0]}


def forked_child(fast, inputs: dict, expected: torch.Tensor) -> dict:
    """The parent's median call (at its thread count, and on one thread as a forked child runs)
    against a forked child's first and second calls."""
    parent = statistics.median(timed(lambda: fast(**inputs)) for _ in range(10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parent_one_thread = statistics.median(timed(lambda: fast(**inputs)) for _ in range(10))
    torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()

    def child() -> None:
        first = timed(lambda: results.put(torch.equal(expected, fast(**inputs).last_hidden_state)))
        second = timed(lambda: fast(**inputs))
        results.put((first, second, torch.get_num_threads()))

    process = context.Process(target=child)
    process.start()
    process.join(300)
    if process.is_alive():
        process.kill()
        return {"child": "hung"}
    equal, (first, second, child_threads) = results.get(), results.get()
    return {"parent_median_s": parent, "parent_threads": threads, "parent_one_thread_median_s": parent_one_thread,
            "child_first_s": first, "child_second_s": second, "child_threads": child_threads,
            "child_equal_to_eager": equal}


def budget_of(name: str, layers: int, fraction: float) -> dict:
    """In this (fresh) process: growth from before compile through 3 calls, against the budget."""
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),))
    with tempfile.TemporaryDirectory() as folder:
        if name == "workload":
            eager, weights, weight_bytes = llama_on_disk(folder, layers)
            inputs = {"input_ids": torch.randint(0, 8192, (1, 128), generator=torch.Generator().manual_seed(0)),
                      "use_cache": False}
            del eager
            empty = _empty_workload(layers)
            budget = int(weight_bytes * fraction)
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import ARCHS, build_empty, build_saved, minimum_budget

            arch = ARCHS[name]
            build_saved(arch, Path(folder))
            weights, inputs, empty = vramfx.DiskMap(folder), arch.inputs(), build_empty(arch)
            budget = None
        gc.collect()
        release_freed_memory()
        with PeakMemory("cpu") as peak:
            if budget is None:  # the probe that finds the minimum is counted too
                budget = minimum_budget(empty, weights, inputs)
            fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu")
            for _ in range(3):
                fast(**inputs)
        nodes = len(fast.compiled_graphs[0].captured.graph_module.graph.nodes)
        return {"model": name, "budget": budget, "growth": peak.growth_bytes, "captured_nodes": nodes,
                "growth_over_budget": peak.growth_bytes / budget}


def _empty_workload(layers: int) -> torch.nn.Module:
    from transformers import LlamaModel

    from workloads import llama_config

    with vramfx.skip_model_initialization():
        return LlamaModel(llama_config(layers)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-fraction", type=float, default=0.3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--budget-of", help=argparse.SUPPRESS)  # one model's budget figure, in a fresh process
    args = parser.parse_args()
    if args.budget_of:
        print(json.dumps(budget_of(args.budget_of, args.layers, args.budget_fraction)))
        return

    figures: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        eager, weights, weight_bytes = llama_on_disk(folder, args.layers)
        inputs = {"input_ids": torch.randint(0, 8192, (1, 128), generator=torch.Generator().manual_seed(0)),
                  "use_cache": False}
        with torch.no_grad():
            expected = eager(**inputs).last_hidden_state
        del eager
        budget = int(weight_bytes * args.budget_fraction)
        fast = vramfx.compile(_empty_workload(args.layers), budget=budget, weights=weights, device="cpu",
                              example_kwargs=inputs)
        fast(**inputs)
        figures["failing_calls"] = failing_calls(fast, inputs, expected)
        figures["fork"] = forked_child(fast, inputs, expected)
        fast.release()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import ARCHS

    figures["budget"] = []
    for name in ["workload", *ARCHS]:
        done = subprocess.run([sys.executable, __file__, "--budget-of", name, "--layers", str(args.layers),
                               "--budget-fraction", str(args.budget_fraction)],
                              capture_output=True, text=True, check=True)
        figures["budget"].append(json.loads(done.stdout.strip().splitlines()[-1]))

    calls = figures["failing_calls"]
    print(f"{calls['calls']} calls after a warm-up, every tenth raising: {calls['equal_to_eager']} equal to eager, "
          f"{calls['raised']} raised; RssAnon over them: {format_bytes(calls['rss_growth'])} growth")
    fork = figures["fork"]
    print(f"fork: parent median call {fork['parent_median_s'] * 1e3:.1f} ms on {fork['parent_threads']} threads, "
          f"{fork['parent_one_thread_median_s'] * 1e3:.1f} ms on 1; child ({fork['child_threads']} thread) first call "
          f"{fork['child_first_s'] * 1e3:.1f} ms, second {fork['child_second_s'] * 1e3:.1f} ms; "
          f"equal to eager: {fork['child_equal_to_eager']}")
    for row in figures["budget"]:
        print(f"budget {row['model']:>15}: growth {format_bytes(row['growth']):>10} of {format_bytes(row['budget']):>10} "
              f"({row['growth_over_budget']:.0%}), {row['captured_nodes']} captured nodes")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
