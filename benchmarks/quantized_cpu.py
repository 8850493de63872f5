"""Quantized storage on CPU: decode speed per GGML type, and bf16, fp8, Q8_0 and Q4_K storage of one
model side by side at the same budget.

Part 1 decodes one 4096 x 4096 weight per type into bfloat16 with vramfx's torch kernels (the
engine's cast step) and, for scale, with the gguf package's numpy reference; it prints values per
second and the stored bytes per second read.

Part 2 writes a Llama-like model (hidden 1024, 2816 FFN, seq 128, bf16 compute) four ways —
converted to bf16 and to fp8 safetensors (``vramfx.convert``, keep list "auto"), and as llama.cpp
GGUF files in Q8_0 and Q4_K (matrices quantized, norms F32) — and compiles each under the same
budget (a quarter of the bf16 weights). Calls are interleaved and medians compared; the bytes
each call reads are counted at the file reader. Q8_0 blocks are the gguf package's quantization
of the weights; the gguf package has no k-quant quantizer, so Q4_K blocks are drawn at random
(outputs then differ from bf16's; timing and bytes do not depend on the values).

    python benchmarks/quantized_cpu.py [--layers 12] [--calls 5] [--budget-fraction 0.25] [--threads N]
                                       [--decode-only] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import vramfx
from workloads import llama_config, timed
from vramfx.util import format_bytes
from vramfx.quant.decoders import BlockDecoder
from vramfx.quant.ggml import FORMATS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_files import dequantize, llama_gguf, random_blocks  # noqa: E402  (the tests' GGUF writer)

DECODED = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q3_K", "Q2_K", "F16", "BF16")


def decode_speeds(side: int, repeats: int) -> list[dict]:
    """Median seconds to decode one ``side`` x ``side`` weight of each type into bf16."""
    rng = np.random.default_rng(0)
    rows = []
    for name in DECODED:
        block = FORMATS[name]
        numel = side * side
        if name in ("F16", "BF16"):
            dtype = torch.float16 if name == "F16" else torch.bfloat16
            stored = torch.randn(numel).to(dtype).view(torch.uint8)
        else:
            stored = torch.from_numpy(random_blocks(name, numel // block.block_size, rng).reshape(-1))
        decoder = BlockDecoder((side, side), block=block)
        out = torch.empty(side, side, dtype=torch.bfloat16)
        decoder.decode_into(stored, out)
        ours = statistics.median(timed(lambda: decoder.decode_into(stored, out)) for _ in range(repeats))
        numpy_stored = stored.numpy()
        reference = timed(lambda: dequantize(numpy_stored if name != "F16" else numpy_stored.view(np.float16), name))
        rows.append({"type": name, "values": numel, "stored_bytes": decoder.nbytes, "seconds": ours,
                     "reference_seconds": reference})
    return rows


class ReadCounter:
    """Bytes a DiskMap hands out, summed over its whole-tensor and range reads."""

    def __init__(self, reader: vramfx.DiskMap) -> None:
        self.nbytes = 0
        self._lock = threading.Lock()
        for method in ("read_into", "read_range_into"):
            original = getattr(reader, method)

            def counted(key, *args, _original=original, **kwargs):
                with self._lock:
                    self.nbytes += args[-1].numel()
                return _original(key, *args, **kwargs)

            setattr(reader, method, counted)


def compare_storage(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from transformers import LlamaForCausalLM

    config = llama_config(args.layers, vocab=args.vocab)
    if args.smoke:
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 256, 512, 4
        config.num_key_value_heads = 4
    config.tie_word_embeddings = False
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    call = {"input_ids": ids, "use_cache": False}
    bf16 = torch.bfloat16
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        eager = LlamaForCausalLM(config).eval()
        eager.save_pretrained(folder / "fp32", max_shard_size="400MB")
        for linear in ("Q8_0", "Q4_K"):
            llama_gguf(eager, folder / f"model-{linear}.gguf", linear)
        eager.to(bf16)
        with vramfx.skip_model_initialization():
            empty = LlamaForCausalLM(config).eval()
        sources = {
            "bf16 storage": vramfx.DiskMap(vramfx.convert(folder / "fp32", folder / "bf16", dtype=bf16, model=empty)),
            "fp8 storage": vramfx.DiskMap(
                vramfx.convert(folder / "fp32", folder / "fp8", dtype=torch.float8_e4m3fn, model=empty)),
            "Q8_0 GGUF": vramfx.GGUFMap(folder / "model-Q8_0.gguf"),
            "Q4_K GGUF": vramfx.GGUFMap(folder / "model-Q4_K.gguf"),
        }
        options = {"bf16 storage": {"storage_dtype": bf16}, "fp8 storage": {"storage_dtype": torch.float8_e4m3fn}}
        for weights in sources.values():  # warm the page cache: this benchmark measures the warm case
            for key in weights:
                weights[key]
        budget = int(sources["bf16 storage"].nbytes * args.budget_fraction)
        if args.smoke:  # tiny weights: the fixed margin and decode workspace dominate
            budget += 32 * 2**20
        compiled, counters = {}, {}
        for name, weights in sources.items():
            compiled[name] = vramfx.compile(empty, budget=budget, weights=weights, device="cpu", compute_dtype=bf16,
                                            example_kwargs=call, **options.get(name, {}))
            counters[name] = ReadCounter(getattr(weights, "base", weights))
        times: dict[str, list[float]] = {"eager bf16": [], **{name: [] for name in compiled}}
        moved: dict[str, int] = {}
        with torch.no_grad():
            for fast in compiled.values():
                fast(**call)  # loads the resident weights
            for _ in range(args.calls):
                times["eager bf16"].append(timed(lambda: eager(**call)))
                for name, fast in compiled.items():
                    counters[name].nbytes = 0
                    times[name].append(timed(lambda: fast(**call)))
                    moved[name] = counters[name].nbytes
        eager_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    median = {name: statistics.median(t) for name, t in times.items()}
    rows.append({"variant": "eager bf16", "seconds": median["eager bf16"], "stored_bytes": eager_bytes})
    for name, fast in compiled.items():
        plan = fast.plan
        rows.append({"variant": name, "seconds": median[name], "budget_bytes": plan.budget_bytes,
                     "stored_bytes": plan.weight_bytes, "resident_bytes": plan.resident_bytes,
                     "streamed_bytes": plan.streamed_bytes, "read_bytes": moved[name], "casts": len(plan.casts),
                     "upcast_bytes": plan.upcast_bytes, "workspace_bytes": plan.workspace_bytes})
    return rows, {"layers": args.layers, "hidden": config.hidden_size, "seq": args.seq, "budget_bytes": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--side", type=int, default=4096, help="decode benchmark: one side x side weight per type")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode table")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one call: checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.vocab, args.seq, args.calls, args.side = 2, 256, 8, 1, 256
    if args.threads:
        torch.set_num_threads(args.threads)

    speeds = decode_speeds(args.side, repeats=1 if args.smoke else 3)
    print(f"decode into bfloat16, one {args.side} x {args.side} weight per type (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'type':6} {'stored':>10} {'ms':>8} {'Mvalues/s':>10} {'stored GB/s':>12} {'gguf numpy ms':>14}")
    for r in speeds:
        print(f"{r['type']:6} {format_bytes(r['stored_bytes']):>10} {r['seconds'] * 1e3:8.1f} "
              f"{r['values'] / r['seconds'] / 1e6:10.0f} {r['stored_bytes'] / r['seconds'] / 1e9:12.2f} "
              f"{r['reference_seconds'] * 1e3:14.1f}")

    if args.decode_only:
        if args.json:
            args.json.write_text(json.dumps({"decode": speeds}, indent=2))
        return
    rows, setting = compare_storage(args)
    base = next(r["seconds"] for r in rows if r["variant"] == "bf16 storage")
    print()
    print(f"Llama-like, {setting['layers']} layers, hidden {setting['hidden']}, seq {setting['seq']}, compute "
          f"bfloat16, budget {format_bytes(setting['budget_bytes'])} for every variant")
    print(f"{'':14} {'stored':>10} {'resident':>10} {'streamed':>10} {'read':>10} {'casts':>6} {'ms/call':>8} "
          f"{'vs bf16':>8}")
    for r in rows:
        if r["variant"] == "eager bf16":
            print(f"{r['variant']:14} {format_bytes(r['stored_bytes']):>10} {'all':>10} {'':>10} {'':>10} {'':>6} "
                  f"{r['seconds'] * 1e3:8.1f} {r['seconds'] / base:8.3f}")
            continue
        print(f"{r['variant']:14} {format_bytes(r['stored_bytes']):>10} {format_bytes(r['resident_bytes']):>10} "
              f"{format_bytes(r['streamed_bytes']):>10} {format_bytes(r['read_bytes']):>10} {r['casts']:>6} "
              f"{r['seconds'] * 1e3:8.1f} {r['seconds'] / base:8.3f}")
    print(f"medians of {args.calls} interleaved calls; streamed = planned bytes per call, read = bytes the file "
          "reader handed out on a steady call")
    if args.json:
        args.json.write_text(json.dumps({"decode": speeds, "storage": rows, "setting": setting}, indent=2))


if __name__ == "__main__":
    main()
