"""Tokens per second of ``generate`` on CPU: eager, vramfx's graphs, vramfx's module path, accelerate.

The CPU Llama-like workload of ``compile_cpu.py`` as a causal LM (16 layers, hidden 1024, ~0.8 GB
of fp32 weights on disk, page cache warm), greedy decoding of ``--new`` tokens after a
``--prompt``-token prompt. Ways to run it:

- eager, all weights in memory, with transformers' default (dynamic) cache and with a static one;
- ``vramfx.compile`` at the budget, ``fast.generate`` (a static cache: the prompt and the decoding
  steps each run on one captured graph);
- vramfx's module path at the same budget (every module's weights fetched along the recorded order
  each step: what ``generate`` ran on before it ran on graphs);
- accelerate's ``cpu_offload`` (weights in host memory, moved per module) and ``disk_offload``
  (weights in its own offload folder, read per module).

Every run's tokens are checked against eager's. Runs are interleaved, two warm-ups each (captures
and a replan happen there), and the medians compared.

    python benchmarks/generate_cpu.py [--layers 16] [--prompt 32] [--new 32] [--runs 3] [--budget-fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import vramfx
from workloads import llama_config, timed
from vramfx.util import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and one run, to check the script runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = llama_config(args.layers)
    if args.smoke:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
        args.runs, args.new, args.prompt = 1, 4, 8
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, None, 0
    ids = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    with tempfile.TemporaryDirectory(prefix="vramfx-generate-") as tmp:
        folder = Path(tmp) / "llama"
        torch.manual_seed(0)
        eager = LlamaForCausalLM(config).eval()
        weight_bytes = sum(p.nbytes for p in eager.parameters())
        eager.save_pretrained(folder, max_shard_size="400MB")
        weights = vramfx.DiskMap(folder)
        for key in weights:  # warm the page cache: the warm case is measured
            weights[key]
        expected = eager.generate(ids, **greedy)

        fast = vramfx.from_pretrained(LlamaForCausalLM, folder, budget=_budget(LlamaForCausalLM, folder, ids,
                                      weight_bytes, args.budget_fraction), device="cpu")
        budget = fast.__dict__["_vramfx_budget_bytes"]
        from vramfx.compiler import DEFAULT_MARGIN_BYTES
        from vramfx.swap.fallback import ModulePath

        with vramfx.skip_model_initialization():
            empty = LlamaForCausalLM(config).eval()
        module_path = ModulePath(empty, weights, device=torch.device("cpu"), budget_bytes=budget,
                                 margin_bytes=DEFAULT_MARGIN_BYTES["cpu"], calls=10)
        runners: dict[str, Callable[[], torch.Tensor]] = {
            "eager (dynamic cache)": lambda: eager.generate(ids, **greedy),
            "eager (static cache)": lambda: eager.generate(ids, cache_implementation="static", **greedy),
            "vramfx graphs": lambda: fast.generate(ids, **greedy),
            "vramfx module path": lambda: module_path.generate(ids, **greedy),
        }
        runners.update(_accelerate(LlamaForCausalLM, folder, Path(tmp), ids, greedy))

        times: dict[str, list[float]] = {name: [] for name in runners}
        for name, run in runners.items():  # warm-up: captures, first loads; tokens checked
            assert torch.equal(run(), expected), f"{name} gave other tokens than eager"
            run()  # a graph planned before the next was captured is planned again on its next call
        for _ in range(args.runs):
            for name, run in runners.items():
                times[name].append(timed(run))

    print(f"LlamaForCausalLM, {config.num_hidden_layers} layers, {format_bytes(weight_bytes)} of weights; budget "
          f"{format_bytes(budget)} ({budget / weight_bytes:.0%} of the weights); prompt {args.prompt}, "
          f"{args.new} new tokens, {torch.get_num_threads()} threads; median of {args.runs}")
    rows = []
    base = args.new / statistics.median(times["eager (dynamic cache)"])
    for name, values in times.items():
        rate = args.new / statistics.median(values)
        rows.append({"runner": name, "tokens_per_s": rate, "x_eager": rate / base})
        print(f"  {name:28s} {rate:7.1f} tokens/s  {rate / base:5.2f}x eager")
    print(f"  vramfx graphs: {len(fast.compiled_graphs)} graphs, {format_bytes(fast.plan.streamed_bytes)} "
          f"streamed per step, module path used: {fast.module_path is not None}")
    if args.json:
        args.json.write_text(json.dumps({"weight_bytes": weight_bytes, "budget_bytes": budget, "rows": rows}, indent=2))


def _budget(model_class: type, folder: Path, ids: torch.Tensor, weight_bytes: int, fraction: float) -> int:
    """``fraction`` of the weights, or the smallest budget the prompt's graph plans in plus room
    for the decoding step's graph, whichever is larger."""
    try:
        vramfx.from_pretrained(model_class, folder, budget=1, device="cpu", example_kwargs={"input_ids": ids})
    except vramfx.BudgetError as exc:
        return max(int(weight_bytes * fraction), exc.minimum_bytes * 2)
    raise AssertionError("a 1-byte budget was accepted")


def _accelerate(model_class: type, folder: Path, tmp: Path, ids: torch.Tensor, greedy: dict) -> dict:
    try:
        import accelerate
    except ImportError:
        return {}
    cpu = accelerate.cpu_offload(model_class.from_pretrained(folder).eval(), execution_device=torch.device("cpu"))
    disk = accelerate.disk_offload(model_class.from_pretrained(folder).eval(), str(tmp / "offload"),
                                   execution_device=torch.device("cpu"))
    return {
        "accelerate cpu_offload": lambda: cpu.generate(ids, **greedy),
        "accelerate disk_offload": lambda: disk.generate(ids, **greedy),
    }


if __name__ == "__main__":
    main()
