"""GPU check of quantized storage: decoding on the GPU, a GGUF Llama compiled on CUDA, its budget.

On a machine with one CUDA GPU, from the repository root (about a minute; needs torch,
transformers, safetensors and gguf, no network)::

    pip install --no-deps -e . && pip install gguf && OUT=/tmp/q python benchmarks/quantized_gpu_check.py

It prints what it checks and writes ``quantized_gpu_check.json`` to ``$OUT`` (or ``--out``); the
exit status is 1 if a check fails. ``--smoke`` runs the same code on CPU with tiny sizes (the test
suite does).

1. **Decode.** One ``--side`` × ``--side`` weight per GGML type decoded into bf16 on the device
   with vramfx's torch kernels: equal, bit for bit, to the same decode on the CPU (which equals
   the gguf package's reference); median milliseconds (CUDA events) and values per second.
2. **Model.** A transformers Llama (``--layers`` layers, hidden 2048) written as a llama.cpp
   GGUF in Q4_K, compiled at 25% of its bf16 weights on the device, weights read from the file:
   its output against eager with the reference dequantized weights on the device (bit-exact, or
   the largest difference), ``max_memory_allocated`` growth over two calls against the budget,
   and median time per call against eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import vramfx
from vramfx.quant.decoders import BlockDecoder
from vramfx.quant.ggml import FORMATS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_files import QUANTIZED, llama_gguf, random_blocks  # noqa: E402  (the tests' GGUF writer)


def seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def check_decode(device: torch.device, side: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name in QUANTIZED:
        block = FORMATS[name]
        stored = torch.from_numpy(random_blocks(name, side * side // block.block_size, rng).reshape(-1))
        decoder = BlockDecoder((side, side), block=block)
        on_cpu = torch.empty(side, side, dtype=torch.bfloat16)
        decoder.decode_into(stored, on_cpu)
        stored_dev, out = stored.to(device), torch.empty(side, side, dtype=torch.bfloat16, device=device)
        decoder.decode_into(stored_dev, out)
        elapsed = seconds(lambda: decoder.decode_into(stored_dev, out), device, repeats)
        rows.append({"type": name, "equal_to_cpu": bool(torch.equal(out.cpu(), on_cpu)), "seconds": elapsed,
                     "values_per_s": side * side / elapsed})
    return rows


def check_model(device: torch.device, layers: int, hidden: int, calls: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 256 * 256,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256 or 1,
                         tie_word_embeddings=False)
    call = {"input_ids": torch.randint(0, 8192, (1, 128), generator=torch.Generator().manual_seed(0)).to(device),
            "use_cache": False}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        eager = LlamaForCausalLM(config).eval()
        bf16_bytes = sum(p.numel() for p in eager.parameters()) * 2
        eager.load_state_dict(llama_gguf(eager, Path(folder) / "llama-Q4_K.gguf", "Q4_K"))
        eager = eager.to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            expected = eager(**call).logits
        with vramfx.skip_model_initialization():
            empty = LlamaForCausalLM(config).eval()
        weights = vramfx.GGUFMap(Path(folder) / "llama-Q4_K.gguf")
        budget = bf16_bytes // 4 + 256 * 2**20
        fast = vramfx.compile(empty, budget=budget, weights=weights, device=device, compute_dtype=torch.bfloat16,
                              example_kwargs=call, calls=calls)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        outputs = [fast(**call).logits for _ in range(2)]
        growth = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
        with torch.no_grad():
            eager_s = seconds(lambda: eager(**call), device, calls)
        fast_s = seconds(lambda: fast(**call), device, calls)
        plan = fast.plan
        differences = [float((o.float() - expected.float()).abs().max()) for o in outputs]
        return {"budget_bytes": budget, "peak_bytes": plan.peak_bytes, "growth_bytes": growth,
                "within_budget": growth <= budget, "bit_exact": all(torch.equal(o, expected) for o in outputs),
                "max_abs_difference": max(differences), "stored_bytes": plan.weight_bytes, "bf16_bytes": bf16_bytes,
                "streamed_bytes": plan.streamed_bytes, "eager_seconds": eager_s, "compiled_seconds": fast_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script runs")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.side, args.layers, args.hidden, args.calls = 256, 1, 256, 1
    decode = check_decode(device, args.side, repeats=1 if args.smoke else 5)
    print(f"decode into bf16 on {device}, one {args.side} x {args.side} weight per type")
    for r in decode:
        print(f"  {r['type']:5} equal to CPU: {r['equal_to_cpu']!s:5}  {r['seconds'] * 1e3:8.2f} ms  "
              f"{r['values_per_s'] / 1e9:6.2f} Gvalues/s")
    model = check_model(device, args.layers, args.hidden, args.calls)
    print(f"Llama {args.layers} layers, hidden {args.hidden}, Q4_K GGUF at 25% of its bf16 weights: "
          f"bit-exact {model['bit_exact']} (max |diff| {model['max_abs_difference']:.3g}), growth "
          f"{model['growth_bytes'] / 2**20:.1f} MiB of a {model['budget_bytes'] / 2**20:.1f} MiB budget, "
          f"{model['compiled_seconds'] * 1e3:.1f} ms/call against eager {model['eager_seconds'] * 1e3:.1f} ms, "
          f"streamed {model['streamed_bytes'] / 2**20:.1f} MiB per call")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_gpu_check.json").write_text(json.dumps({"decode": decode, "model": model}, indent=2))
    ok = all(r["equal_to_cpu"] for r in decode) and model["within_budget"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
