"""LoRA on a compiled model: a hot swap against a fresh compile, and time per call with a rank-64
LoRA against none at the same budget, side by side in one process.

A Llama-like model (hidden 1024) with its weights on disk, page cache warm, compiled at 25% of its
weights, with a PEFT LoRA on every attention and MLP projection. It prints:

- a fresh compile of the LoRA model (capture, plan, first call), against a hot swap: another
  LoRA's values written into the same slots (as ``load_lora_weights(..., hotswap=True)`` writes
  them) and the next call, and a scale change (``set_scale``) and the next call; a steady call
  for reference. Outputs are checked against eager PEFT after each;
- time per call with the rank-64 LoRA against the same model without one, at the same budget,
  calls interleaved, medians;
- on the layer-swap path (every linear wrapped, ``vram_limit`` the same budget): time per call with
  the LoRA unfused (PEFT's branch beside each streamed linear) against fused (``merge``: added to
  each weight after its fetch), medians; outputs checked against eager PEFT fused.

    python benchmarks/lora.py [--layers 8] [--rank 64] [--calls 7] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import vramfx
from vramfx.util import format_bytes
from workloads import llama_config, llama_on_disk, timed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(models, rank: int, name: str, seed: int) -> None:
    """The same random rank-``rank`` LoRA on every model (values copied from the first)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    for model in models:
        inject_adapter_in_model(config, model, adapter_name=name)
    torch.manual_seed(seed)
    values = {k: torch.randn_like(v) * 0.02 for k, v in models[0].state_dict().items() if "lora_" in k}
    for model in models:
        model.load_state_dict(values, strict=False)


def lora_values(model, seed: int) -> dict[str, torch.Tensor]:
    """Another LoRA of the same ranks and targets."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items() if "lora_" in k}


def write_in_place(model, values: dict[str, torch.Tensor]) -> None:
    """``values`` into the model's LoRA slots, as PEFT's hot swap writes them (``.data.copy_``)."""
    for name, p in model.named_parameters():
        if name in values:
            p.data.copy_(values[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--smoke", action="store_true", help="a 1-layer model, 2 calls: checks the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.calls, args.rank, args.budget_fraction = 1, 2, 8, 1.0

    from peft.tuners.lora import LoraLayer
    from transformers import LlamaModel

    config = llama_config(args.layers)
    kwargs = {"input_ids": torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}

    def call(model):
        with torch.no_grad():
            return model(**kwargs).last_hidden_state

    with tempfile.TemporaryDirectory() as folder:
        eager, weights, weight_bytes = llama_on_disk(folder, args.layers)
        budget = int(weight_bytes * args.budget_fraction)

        def empty():
            with vramfx.skip_model_initialization():
                return LlamaModel(config).eval()

        plain = vramfx.compile(empty(), budget=budget, weights=weights, device="cpu", example_kwargs=kwargs)
        lora_model = empty()
        add_lora([eager, lora_model], args.rank, "a", seed=1)
        lora_bytes = sum(p.numel() * p.element_size() for n, p in lora_model.named_parameters() if "lora_" in n)

        start = time.perf_counter()
        fast = vramfx.compile(lora_model, budget=budget, weights=weights, device="cpu", example_kwargs=kwargs)
        out = call(fast)
        fresh_seconds = time.perf_counter() - start
        assert torch.equal(out, call(eager)), "compiled LoRA output differs from eager"
        steady_seconds = statistics.median(timed(lambda: call(fast)) for _ in range(3))

        values = lora_values(lora_model, seed=2)
        start = time.perf_counter()
        write_in_place(lora_model, values)
        out = call(fast)
        swap_seconds = time.perf_counter() - start
        write_in_place(eager, values)
        assert torch.equal(out, call(eager)), "output after the hot swap differs from eager"

        start = time.perf_counter()
        for layer in (m for m in lora_model.modules() if isinstance(m, LoraLayer)):
            layer.set_scale("a", 0.5)
        out = call(fast)
        scale_seconds = time.perf_counter() - start
        for layer in (m for m in eager.modules() if isinstance(m, LoraLayer)):
            layer.set_scale("a", 0.5)
        assert torch.equal(out, call(eager)), "output after the scale change differs from eager"
        assert len(fast.compiled_graphs) == 1, "a value change made a new capture"

        plain_times, lora_times = [], []
        for _ in range(args.calls):
            plain_times.append(timed(lambda: call(plain)))
            lora_times.append(timed(lambda: call(fast)))
        plan, plain_plan = fast.plan, plain.plan
        del fast, plain

        swap_model = empty()
        add_lora([swap_model], args.rank, "a", seed=1)
        swap_model.load_state_dict({k: v for k, v in eager.state_dict().items() if "lora_" in k}, strict=False)
        for layer in (m for m in swap_model.modules() if isinstance(m, LoraLayer)):
            layer.set_scale("a", 0.5)
        from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management

        swapped = enable_vram_management(
            swap_model, {torch.nn.Linear: AutoWrappedLinear, torch.nn.Embedding: AutoWrappedModule},
            {"offload_dtype": "disk", "offload_device": "disk", "computation_device": "cpu"},
            vram_limit=budget / 2**30, disk_map=weights,
        )
        call(swapped)  # records the order
        unfused_times = [timed(lambda: call(swapped)) for _ in range(args.calls)]
        for model in (eager, swapped):
            for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
                layer.merge()
        assert torch.equal(call(swapped), call(eager)), "fused LoRA on the layer-swap path differs from eager"
        fused_times = [timed(lambda: call(swapped)) for _ in range(args.calls)]

    plain_median, lora_median = statistics.median(plain_times), statistics.median(lora_times)
    print(f"model        Llama-like, {args.layers} layers, hidden 1024, seq {args.seq}: {format_bytes(weight_bytes)} on disk; "
          f"budget {format_bytes(budget)} ({args.budget_fraction:.0%}); torch threads {torch.get_num_threads()}")
    print(f"LoRA         rank {args.rank} on {', '.join(TARGETS)}: {format_bytes(lora_bytes)} in host memory")
    print(f"fresh compile + first call   {fresh_seconds * 1e3:9.1f} ms")
    print(f"hot swap + next call         {swap_seconds * 1e3:9.1f} ms   ({fresh_seconds / swap_seconds:.1f}x faster than a fresh compile)")
    print(f"scale change + next call     {scale_seconds * 1e3:9.1f} ms")
    print(f"steady call                  {steady_seconds * 1e3:9.1f} ms")
    print(f"per call, no LoRA            {plain_median * 1e3:9.1f} ms (median of {args.calls}); streamed "
          f"{format_bytes(plain_plan.streamed_bytes)}, resident {format_bytes(plain_plan.resident_bytes)}")
    print(f"per call, rank-{args.rank} LoRA        {lora_median * 1e3:9.1f} ms ({lora_median / plain_median:.3f}x); streamed "
          f"{format_bytes(plan.streamed_bytes)}, resident {format_bytes(plan.resident_bytes)}")
    unfused_median, fused_median = statistics.median(unfused_times), statistics.median(fused_times)
    print(f"layer swap, LoRA unfused     {unfused_median * 1e3:9.1f} ms (median of {args.calls})")
    print(f"layer swap, LoRA fused       {fused_median * 1e3:9.1f} ms ({fused_median / unfused_median:.3f}x; the "
          "deltas added after each fetch)")


if __name__ == "__main__":
    main()
