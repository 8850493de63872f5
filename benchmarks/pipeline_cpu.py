"""A whole diffusers pipeline's generation on CPU: vramfx.compile_pipeline beside eager and
diffusers' own offloading, side by side in one process.

A Flux pipeline (CLIP and T5 text encoders, transformer, VAE; tokenizers built locally) is saved
to a temporary folder at ``--scale`` times the test suite's tiny widths. Each contender runs
whole generations (prompt to decoded image), calls interleaved so all see the same machine
state; the script prints each one's median seconds per generation, its ratio to eager, and the
RssAnon it grew by over a generation (its weights loaded before, where it loads them once):

- eager: ``FluxPipeline.from_pretrained``, every weight in memory;
- vramfx: ``vramfx.compile_pipeline`` at ``--budget-fraction`` of the weights (at least the
  pipeline's minimum), weights read from the folder;
- ``enable_model_cpu_offload``: on a CPU the onload and offload devices are the same, so every
  weight stays in memory (it needs an accelerator to save any): shown for its overhead only;
- group offloading from disk (``enable_group_offload``, ``offload_to_disk_path``), the CPU
  variant that does keep weights off memory: ``block_level`` one block per group, and whole
  components (every block in one group), diffusers' model offload from disk.

    python benchmarks/pipeline_cpu.py [--scale 8] [--steps 8] [--size 64] [--generations 3]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import vramfx  # noqa: E402
from vramfx.measure import PeakMemory, release_freed_memory  # noqa: E402
from vramfx.util import format_bytes  # noqa: E402
from tiny_pipelines import FLUX_CALL, eager_pipeline, generator, output_of, save_flux  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8, help="times the tiny pipeline's widths and depth")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.3)
    args = parser.parse_args()
    from diffusers import FluxPipeline

    work = Path(tempfile.mkdtemp(prefix="vramfx-pipeline-"))
    try:
        root = save_flux(work / "flux", scale=args.scale)
        call = dict(FLUX_CALL, num_inference_steps=args.steps, height=args.size, width=args.size)
        weight_bytes = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        try:
            vramfx.compile_pipeline(FluxPipeline, root, budget=1, device="cpu", example=call)
        except vramfx.BudgetError as exc:
            minimum = exc.minimum_bytes
        budget = max(minimum, int(args.budget_fraction * weight_bytes) + minimum // 2)

        def eager():
            return eager_pipeline(FluxPipeline, root)  # weights in torch's own memory, as the tests compare

        def compiled():
            return vramfx.compile_pipeline(FluxPipeline, root, budget=budget, device="cpu", example=call)

        def model_offload():
            pipe = eager_pipeline(FluxPipeline, root)
            pipe.enable_model_cpu_offload(device="cpu")
            return pipe

        def group(blocks: int):
            def make():
                pipe = FluxPipeline.from_pretrained(str(root))
                folder = tempfile.mkdtemp(prefix="group-", dir=work)
                pipe.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type="block_level",
                                          num_blocks_per_group=blocks, offload_to_disk_path=folder)
                return pipe
            return make

        contenders = {
            "eager (all weights in memory)": eager,
            f"vramfx.compile_pipeline @ {format_bytes(budget)}": compiled,
            "enable_model_cpu_offload (cpu: all in memory)": model_offload,
            "group offload from disk, 1 block/group": group(1),
            "group offload from disk, whole components": group(1000),
        }
        pipes, loaded = {}, {}
        for name, make in contenders.items():
            release_freed_memory()
            with PeakMemory("cpu") as peak:
                pipes[name] = make()
                output_of(pipes[name](**call, generator=generator()))  # warm-up: captures, first loads
            loaded[name] = peak.growth_bytes
        reference = output_of(pipes["eager (all weights in memory)"](**call, generator=generator()))
        times: dict[str, list[float]] = {n: [] for n in contenders}
        growth: dict[str, int] = {n: 0 for n in contenders}
        equal: dict[str, bool] = {}
        for _ in range(args.generations):
            for name, pipe in pipes.items():
                gc.collect()
                release_freed_memory()
                with PeakMemory("cpu") as peak:
                    start = time.perf_counter()
                    out = output_of(pipe(**call, generator=generator()))
                    times[name].append(time.perf_counter() - start)
                growth[name] = max(growth[name], peak.growth_bytes)
                equal[name] = torch.equal(out, reference)
        base = statistics.median(times["eager (all weights in memory)"])
        print(f"Flux pipeline at scale {args.scale}: weights {format_bytes(weight_bytes)}, {args.steps} steps, "
              f"{args.size}x{args.size}; pipeline minimum {format_bytes(minimum)}, budget {format_bytes(budget)}; "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'contender':50} {'s/generation':>12} {'x eager':>8} {'RssAnon +gen':>13} {'+first gen':>11}  equal")
        for name in contenders:
            median = statistics.median(times[name])
            print(f"{name:50} {median:12.3f} {median / base:8.2f} {format_bytes(growth[name]):>13} "
                  f"{format_bytes(loaded[name]):>11}  {equal[name]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
