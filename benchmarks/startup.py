"""Start-up: what a new process pays to compile a 40-block Wan-shaped model, without and with
the persistent cache of captures and plans, and with its 40 blocks captured once.

A diffusers ``WanTransformer3DModel`` with 40 layers and small dimensions (the graph of Wan 14B,
6,430 nodes, at a few MB of weights saved to a temporary folder) is compiled in fresh
subprocesses, each timing ``vramfx.compile(..., example_kwargs=...)`` (capture, liveness,
schedule, rewrite, engine) after its imports:

- ``whole export``: ``VRAMFX_CACHE=0 VRAMFX_BLOCK_CAPTURE=0``, every process exports the whole
  model with ``torch.export`` (every block traced) and plans it;
- ``no cache``: ``VRAMFX_CACHE=0``, every process captures with one block traced and copied for
  its siblings (:mod:`vramfx.capture_blocks`, the default) and plans;
- ``first``: an empty cache, the process captures as ``no cache`` does and writes the capture
  and the plan;
- ``second``: a new process with those entries, which skips ``torch.export`` and the schedule.

    python benchmarks/startup.py [--layers 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import vramfx
from diffusers import WanTransformer3DModel

def build(layers):
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=layers, rope_max_seq_len=32)

folder, layers = sys.argv[1], int(sys.argv[2])
if sys.argv[3] == "save":
    torch.manual_seed(0)
    build(layers).save_pretrained(folder)
    sys.exit(0)
with vramfx.skip_model_initialization():
    model = build(layers).eval()
weights = vramfx.DiskMap(folder)
g = torch.Generator().manual_seed(0)
inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([10]),
          "encoder_hidden_states": torch.randn(1, 8, 32, generator=g), "return_dict": False}
start = time.perf_counter()
fast = vramfx.compile(model, budget="1GB", weights=weights, device="cpu", example_kwargs=inputs)
seconds = time.perf_counter() - start
fast(**inputs)
print(json.dumps({"compile_seconds": seconds, "nodes": len(fast.compiled_graphs[0].captured.graph_module.graph.nodes)}))
"""


def child(folder: str, layers: int, mode: str, env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, folder, str(layers), mode], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"child process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]) if mode != "save" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="processes of each kind (medians are shown)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as caches:
        base = dict(os.environ)
        child(folder, args.layers, "save", base)
        figures: dict[str, list[float]] = {"whole export": [], "no cache": [], "first": [], "second": []}
        nodes = 0
        for repeat in range(args.repeats):
            whole = dict(base, VRAMFX_CACHE="0", VRAMFX_BLOCK_CAPTURE="0")
            figures["whole export"].append(child(folder, args.layers, "run", whole)["compile_seconds"])
            off = dict(base, VRAMFX_CACHE="0", VRAMFX_BLOCK_CAPTURE="1")
            figures["no cache"].append(child(folder, args.layers, "run", off)["compile_seconds"])
            on = dict(base, VRAMFX_CACHE="1", VRAMFX_BLOCK_CAPTURE="1", VRAMFX_CACHE_DIR=str(Path(caches) / f"run{repeat}"))
            figures["first"].append(child(folder, args.layers, "run", on)["compile_seconds"])
            result = child(folder, args.layers, "run", on)
            figures["second"].append(result["compile_seconds"])
            nodes = result["nodes"]

    medians = {k: statistics.median(v) for k, v in figures.items()}
    print(f"model        WanTransformer3DModel, {args.layers} layers, small dims: {nodes} graph nodes")
    print(f"processes    {args.repeats} of each kind, compile time after imports (median; all: "
          + ", ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in figures.items()) + ")")
    whole = medians["whole export"]
    print(f"whole export {whole:6.2f} s   (VRAMFX_CACHE=0 VRAMFX_BLOCK_CAPTURE=0: every block traced, every process)")
    print(f"no cache     {medians['no cache']:6.2f} s   ({medians['no cache'] / whole:.2f}x whole export; "
          "VRAMFX_CACHE=0: one block traced, copied for its siblings)")
    print(f"first        {medians['first']:6.2f} s   ({medians['first'] / whole:.2f}x whole export; "
          "captures as no cache, writes capture and plan)   (goal <= 0.50x)")
    print(f"second       {medians['second']:6.2f} s   ({medians['second'] / whole:.2f}x whole export; "
          "reads both, no torch.export, no schedule)   (goal <= 3 s)")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "nodes": nodes, "seconds": figures,
                                         "medians": medians, "time": time.time()}, indent=2))


if __name__ == "__main__":
    main()
