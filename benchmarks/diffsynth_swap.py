"""Weight-wait time per call: vramfx's layer swap against DiffSynth-Studio's own layers, on its Wan DiT.

DiffSynth-Studio's ``WanModel`` (a Wan2.1-1.3B-wide config, fewer blocks; random weights saved to
safetensors, page cache warm), driven as its pipeline drives it: ``model_fn_wan_video(dit=...)``,
which calls the blocks one by one and never the model's forward. Four ways, calls interleaved in one
process so all see the same machine state:

- eager, all weights in memory;
- DiffSynth-Studio's ``enable_vram_management`` with its own module map, weights on disk (its
  low-VRAM config): every module is read when it is called; its weight wait is the time its wrappers
  spend in ``computation()`` (reading, casting and copying the module's weights);
- ``vramfx.swap`` with the same map, config and disk weights, only the imports changed, at
  ``--limit-fraction`` of the weights, synchronous (``prefetch=False``);
- the same with prefetch: passes are found from the module calls, the planner keeps what fits
  and fetches the rest ahead; its weight wait is ``swap_stats().wait_seconds``.

Every output is checked against eager (``torch.equal``). Needs ``pip install --no-deps
diffsynth==2.1.12`` and the ``diffsynth-test`` extra.

    python benchmarks/diffsynth_swap.py [--dim 1536] [--layers 4] [--calls 5] [--limit-fraction 0.5] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import vramfx  # noqa: E402
import vramfx.swap  # noqa: E402
from diffsynth_models import WAN_MAP, classes, load, missing, wan_inputs  # noqa: E402
from vramfx.util import format_bytes  # noqa: E402

VRAM_CONFIG = dict(
    offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk",
    preparing_dtype=torch.float32, preparing_device="cpu", computation_dtype=torch.float32, computation_device="cpu",
)


class WeightWait:
    """Seconds DiffSynth-Studio's wrappers spend getting their weights (``computation()``)."""

    def __init__(self, layers) -> None:
        self.seconds = 0.0
        for cls in (layers.AutoWrappedModule, layers.AutoWrappedNonRecurseModule, layers.AutoWrappedLinear):
            if "computation" in cls.__dict__:
                cls.computation = self._timed(cls.__dict__["computation"])

    def _timed(self, method):
        @functools.wraps(method)
        def timed(module, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(module, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--limit-fraction", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, two calls: checks the code runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if missing():
        sys.exit(f"DiffSynth-Studio is not installed ({', '.join(missing())} missing); see the docstring")
    if args.smoke:
        args.dim, args.layers, args.frames, args.size, args.calls = 64, 2, 2, 8, 2

    ds = load()
    wait = WeightWait(ds.layers)
    heads = args.dim // 128 if args.dim >= 256 else args.dim // 32  # head dims whose rotary parts are even

    def build() -> torch.nn.Module:
        return ds.wan.WanModel(
            dim=args.dim, in_dim=16, ffn_dim=args.dim * 35 // 6, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
            patch_size=(1, 2, 2), num_heads=heads, num_layers=args.layers, has_image_input=False,
        ).eval()

    g = torch.Generator().manual_seed(1)
    inputs = wan_inputs(g, frames=args.frames, size=args.size)
    inputs["context"] = torch.randn(1, 16, 4096, generator=g)
    module_map = classes(ds.maps[WAN_MAP])

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        eager = build()
        path = str(Path(folder) / "dit.safetensors")
        save_file(eager.state_dict(), path)
        weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        limit = int(weight_bytes * args.limit_fraction)

        def managed(lib_enable, skip, disk_map, **kwargs) -> torch.nn.Module:
            with skip():
                dit = build()
            return lib_enable(dit, module_map, vram_config=VRAM_CONFIG, disk_map=disk_map, **kwargs)

        runs = {
            "eager": eager,
            "diffsynth": managed(ds.enable_vram_management, ds.layers.skip_model_initialization, ds.DiskMap(path, "cpu")),
            "vramfx_sync": managed(vramfx.swap.enable_vram_management, vramfx.skip_model_initialization,
                                   vramfx.swap.DiskMap(path, "cpu"), vram_limit=f"{limit}B", prefetch=False),
            "vramfx": managed(vramfx.swap.enable_vram_management, vramfx.skip_model_initialization,
                              vramfx.swap.DiskMap(path, "cpu"), vram_limit=f"{limit}B"),
        }
        times = {name: [] for name in runs}
        waits = {name: [] for name in runs if name != "eager"}
        with torch.no_grad():
            expected = ds.model_fn_wan_video(dit=eager, **inputs)
            for name, dit in runs.items():  # vramfx: the first call records the pass; the second plans it
                for _ in range(2):
                    assert torch.equal(expected, ds.model_fn_wan_video(dit=dit, **inputs)), f"{name} differs from eager"
            for _ in range(args.calls):
                for name, dit in runs.items():
                    before = wait.seconds
                    start = time.perf_counter()
                    out = ds.model_fn_wan_video(dit=dit, **inputs)
                    times[name].append(time.perf_counter() - start)
                    assert torch.equal(expected, out), f"{name} differs from eager"
                    if name == "diffsynth":
                        waits[name].append(wait.seconds - before)
                    elif name != "eager":
                        waits[name].append(vramfx.swap.swap_stats(dit).wait_seconds)
        stats = {name: vramfx.swap.swap_stats(runs[name]) for name in ("vramfx_sync", "vramfx")}

    medians = {name: statistics.median(t) for name, t in times.items()}
    wait_medians = {name: statistics.median(w) for name, w in waits.items()}
    print(f"model    DiffSynth-Studio WanModel, dim {args.dim}, {args.layers} blocks, "
          f"{args.frames * (args.size // 2) ** 2} tokens: {format_bytes(weight_bytes)} of fp32 weights on disk "
          "(page cache warm)")
    print(f"driven   model_fn_wan_video(dit=...), medians of {args.calls} calls, {torch.get_num_threads()} torch threads; "
          f"vramfx at vram_limit {format_bytes(limit)} ({args.limit_fraction:.0%} of weights)")
    labels = {"eager": "eager (all in RAM)", "diffsynth": "DiffSynth layers", "vramfx_sync": "vramfx, no prefetch",
              "vramfx": "vramfx"}
    for name, label in labels.items():
        line = f"{label:<22} {medians[name]:7.3f} s/call  {medians[name] / medians['eager']:6.2f}x eager"
        if name in wait_medians:
            line += f"   waits {wait_medians[name]:7.3f} s/call for weights"
        if name in stats:
            st = stats[name]
            line += (f"   keeps {format_bytes(st.resident_bytes)}, streams {format_bytes(st.fetched_bytes)}, "
                     f"{st.prefetched} fetched ahead / {st.synchronous} waited")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({
            "weights_bytes": weight_bytes, "limit_bytes": limit, "seconds": medians, "wait_seconds": wait_medians,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        }, indent=2))


if __name__ == "__main__":
    main()
