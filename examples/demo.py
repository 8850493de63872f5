"""vramfx demo: compile a model under a budget a quarter of its weights, print the plan, check it.

Builds a small Llama (random weights, ~160 MB), saves it as sharded safetensors, rebuilds it with
no weights under ``skip_model_initialization``, and compiles it with a budget of 25% of its
weights: most weights are streamed from disk into a fixed arena while the model runs. Prints the
plan, checks the logits equal eager's bit for bit on two calls, and measures the memory it used
(RssAnon growth) against the budget. Runs in a few seconds on a CPU, offline.

    python examples/demo.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import vramfx
from vramfx.measure import PeakMemory
from vramfx.util import format_bytes


def main() -> None:
    hf_logging.disable_progress_bar()
    config = LlamaConfig(vocab_size=8192, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                         num_attention_heads=10, num_key_value_heads=5)
    torch.manual_seed(0)
    eager = LlamaForCausalLM(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    ids = torch.randint(0, config.vocab_size, (1, 32))
    with torch.no_grad():
        expected = eager(input_ids=ids, use_cache=False).logits

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        eager.save_pretrained(folder, max_shard_size="50MB")
        del eager
        with vramfx.skip_model_initialization():
            model = LlamaForCausalLM(config).eval()  # parameters on meta: no memory, no init work
        budget = weight_bytes // 4
        print(f"model: Llama, {format_bytes(weight_bytes)} of weights in {len(list(folder.glob('*.safetensors')))} "
              f"safetensors shards; budget {format_bytes(budget)} (25%)")

        # The first compile in a process also measures compute speed and loads torch.export's
        # machinery (tens of MB it keeps); pay that on a toy model so what follows is the model's.
        vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),))
        with PeakMemory("cpu") as peak:
            start = time.perf_counter()
            fast = vramfx.compile(model, budget=budget, weights=vramfx.DiskMap(folder), device="cpu",
                                  example_kwargs={"input_ids": ids, "use_cache": False})
            compiled = time.perf_counter() - start
            outputs = [fast(input_ids=ids, use_cache=False).logits for _ in range(2)]
        print(f"compiled in {compiled:.2f} s (capture, liveness, schedule, rewrite)\n")
        print(fast.plan.summary())
        print()

    for call, got in enumerate(outputs, 1):
        if not torch.equal(got, expected):
            raise SystemExit(f"FAILED: call {call} differs from eager (max abs diff {(got - expected).abs().max():.3g})")
    print(f"logits {tuple(expected.shape)} equal eager's bit for bit on both calls")
    print(f"measured RssAnon growth over compile + 2 calls: {format_bytes(peak.growth_bytes)} "
          f"(budget {format_bytes(budget)}, planned peak {format_bytes(fast.plan.peak_bytes)})")


if __name__ == "__main__":
    main()
