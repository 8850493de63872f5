"""vramfx against eager and the peers, side by side in one run, on the CPU.

For each workload (a Llama-like LLM, a Flux-like DiT, a UNet; ~0.8 GB fp32 each, random weights
saved once to safetensors under ``benchmarks/.cache``) every contender runs the same inputs: eager
with all weights in RAM, vramfx ``compile`` at 50%, 25% and 10% of the weights, the vramfx
layer-swap path, accelerate ``disk_offload``/``cpu_offload`` and diffusers group offloading
(``block_level`` and ``leaf_level`` from disk). Calls are interleaved (one call of each contender
per round, after a warm-up round) and each row reports the median, the ratio to eager, the peak
RssAnon growth during its calls, the bytes read through ``read()`` per call, and the physical floor
``max(eager compute, streamed bytes / link bandwidth)`` with the link measured in the same run.

A cold-disk variant runs vramfx with page-cache bypass (``O_DIRECT``) and reports its overlap
efficiency against the raw disk bandwidth measured in the same run.

    python benchmarks/run.py            # full run; rewrites docs/benchmarks.md and its chart
    python benchmarks/run.py --smoke    # tiny models, one call: checks the harness in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contenders as c  # noqa: E402

import vramfx  # noqa: E402
from vramfx.budget import rss_anon_bytes, rss_file_bytes  # noqa: E402
from vramfx.measure import PeakMemory, link_bytes_per_s, release_freed_memory  # noqa: E402
from vramfx.util import format_bytes  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Row:
    """One contender's figures on one workload."""

    workload: str
    contender: str
    median_s: float | None = None
    ratio: float | None = None
    held_bytes: int | None = None
    peak_growth_bytes: int | None = None
    read_bytes_per_call: int | None = None
    streamed_bytes: int | None = None
    floor_s: float | None = None
    note: str = ""
    predicted_s: float | None = None
    held_file_bytes: int | None = None


def read_syscall_bytes() -> int:
    """Bytes this process asked for through read()-family calls (``rchar``), page cache or disk."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def page_cache_bandwidth(folder: Path) -> float:
    """Bytes/s of reading the weights with ``read_into`` from a warm page cache (the link)."""
    with vramfx.DiskMap(folder) as weights:
        for key in weights:  # warm
            weights[key]
        return link_bytes_per_s(weights, max_bytes=weights.nbytes)


def disk_bandwidth(folder: Path) -> float:
    """Bytes/s of reading the weights with ``O_DIRECT`` (cold: the page cache is bypassed)."""
    with vramfx.DiskMap(folder) as weights:
        return link_bytes_per_s(weights, bypass_page_cache=True, max_bytes=weights.nbytes)


def build(label: str, make: Callable[[], c.Contender]) -> tuple[c.Contender | None, int, int, str]:
    """Set a contender up; what it holds is the RssAnon it adds (and, apart, the RssFile: mapped
    file pages), measured after warm-up calls."""
    release_freed_memory()  # RssAnon deltas are then a contender's own
    before = rss_anon_bytes()
    before_file = rss_file_bytes()
    try:
        contender = make()
        with torch.no_grad():
            # Two warm-up calls: paths that plan on their first call load kept weights on the second.
            contender.call()
            contender.call()
            # Bytes read per call, counted on a call of its own: the RSS sampler reads /proc too.
            read_before = read_syscall_bytes()
            contender.call()
            contender.read_bytes_per_call = read_syscall_bytes() - read_before
    except Exception as exc:  # a peer that cannot run this workload is reported, not fatal
        traceback.print_exc(limit=2, file=sys.stderr)
        return None, 0, 0, f"{label}: failed: {type(exc).__name__}: {str(exc)[:120]}"
    release_freed_memory()
    return contender, max(0, rss_anon_bytes() - before), max(0, rss_file_bytes() - before_file), ""


def run_workload(workload: c.Workload, args: argparse.Namespace) -> list[Row]:
    folder = c.ensure_saved(workload)
    aligned = c.ensure_aligned(workload)
    inputs = workload.inputs()
    total = c.weight_bytes(folder)
    # Predictions priced with this machine's rates and page-cache link, measured when the first
    # vramfx row is built: compiled rows are built after the peers, right before the calls are
    # measured, since a shared machine's speed drifts by a fifth over the minutes a run takes.
    # Never fitted to a row's own times.
    measured: dict[str, Any] = {}

    def cost() -> vramfx.CostModel:
        if not measured:
            measured["link"] = page_cache_bandwidth(folder)
            # --smoke checks the harness: its tiny graphs are priced, not timed (seconds each).
            measured["calibrated"] = vramfx.CostModel.calibrate("cpu", time_nodes=not args.smoke)
            measured["cost"] = dataclasses.replace(measured["calibrated"], link_bytes_per_s=measured["link"])
        return measured["cost"]

    makers: list[tuple[str, Callable[[], c.Contender]]] = [
        ("eager", lambda: c.eager(workload, folder, inputs)),
        # What compile does by default: weights used in place from the page cache where they can be.
        *[(f"vramfx {f}", lambda f=f: c.vramfx_compiled(workload, aligned, inputs, f, cost_model=cost()))
          for f in args.fractions],
        *[(f"vramfx {f} copying", lambda f=f: c.vramfx_compiled(workload, aligned, inputs, f, in_place=False,
                                                                 cost_model=cost()))
          for f in args.fractions],
        *c.swap_contenders(workload, folder, inputs, 0.25),
        ("accelerate cpu_offload", lambda: c.accelerate_cpu_offload(workload, folder, inputs)),
        ("accelerate disk_offload", lambda: c.accelerate_disk_offload(workload, folder, inputs)),
        ("diffusers block_level", lambda: c.diffusers_group_offload(workload, folder, inputs, "block_level")),
        ("diffusers leaf_level", lambda: c.diffusers_group_offload(workload, folder, inputs, "leaf_level")),
    ]
    if args.bf16:
        low = c.ensure_aligned(workload, torch.bfloat16)
        low_inputs = c.in_dtype(inputs, torch.bfloat16)
        makers += [
            ("eager bf16", lambda: c.eager(workload, low, low_inputs, torch.bfloat16)),
            *[(f"vramfx {f} bf16", lambda f=f: c.vramfx_compiled(workload, low, low_inputs, f, cost_model=cost(),
                                                                  compute_dtype=torch.bfloat16))
              for f in args.bf16_fractions],
        ]
    built: list[tuple[c.Contender, int, int]] = []
    failed: list[Row] = []
    # Peers first, compiled rows last (see above); rows are shown in the order listed.
    compiled = [label.startswith("vramfx ") and not label.startswith("vramfx swap") for label, _ in makers]
    results: dict[int, tuple[c.Contender | None, int, int, str]] = {}
    for i in sorted(range(len(makers)), key=lambda i: compiled[i]):
        results[i] = build(*makers[i])
    cost()  # measured even where every compiled row failed: the header and floors show the link
    for i, (label, _) in enumerate(makers):
        contender, held, held_file, failure = results[i]
        if contender is None:
            failed.append(Row(workload.name, label, note=failure))
        else:
            built.append((contender, held, held_file))

    times: dict[str, list[float]] = {ct.name: [] for ct, _, _ in built}
    growth: dict[str, int] = dict.fromkeys(times, 0)
    with torch.no_grad():
        for _ in range(args.calls):
            for contender, _, _ in built:
                gc.collect()
                with PeakMemory("cpu") as peak:
                    start = time.perf_counter()
                    contender.call()
                    times[contender.name].append(time.perf_counter() - start)
                growth[contender.name] = max(growth[contender.name], peak.growth_bytes)

    # Each row against eager in its own dtype.
    eager_of = {ct.dtype: statistics.median(times[ct.name]) for ct, _, _ in built if ct.name.startswith("eager")}
    rows: list[Row] = []
    eager_fp32 = next((ct for ct, _, _ in built if ct.name.startswith("eager") and ct.dtype == torch.float32), None)
    for contender, held, held_file in built:
        median = statistics.median(times[contender.name])
        eager_s = eager_of.get(contender.dtype)
        streamed = contender.streamed_bytes
        floor = max(eager_s, streamed / measured["link"]) if eager_s is not None and streamed is not None else None
        rows.append(Row(workload.name, contender.name, median, median / eager_s if eager_s else None, held,
                        growth[contender.name], contender.read_bytes_per_call, streamed, floor,
                        note=contender.note, predicted_s=contender.predicted_s, held_file_bytes=held_file))
        if contender is not eager_fp32:
            contender.close()
    rows += failed
    if not args.smoke:
        rows.append(cold_disk_row(workload, aligned, inputs, eager_fp32, measured["calibrated"], args))
    del built, eager_fp32
    gc.collect()
    print_rows(rows, header=f"{workload.name}: {format_bytes(total)} of weights; page-cache link "
                            f"{measured['link'] / 1e9:.2f} GB/s", stream=sys.stdout)
    return rows


def cold_disk_row(workload: c.Workload, folder: Path, inputs: dict[str, Any], eager: c.Contender | None,
                  calibrated: vramfx.CostModel, args: argparse.Namespace) -> Row:
    """vramfx at 25% reading with O_DIRECT, its calls interleaved with eager's (a shared machine's
    load moves both alike): overlap efficiency against the raw disk bandwidth."""
    disk = disk_bandwidth(folder)
    label = "vramfx @ 25%, cold disk (O_DIRECT)"
    # Priced as compile prices O_DIRECT reads: at the disk's rate, measured just now, no core taken.
    cost = dataclasses.replace(calibrated, disk_bytes_per_s=disk)
    contender, held, _, failure = build(label, lambda: c.vramfx_compiled(
        workload, folder, inputs, 0.25, bypass_page_cache=True, label=label, cost_model=cost))
    if contender is None:
        return Row(workload.name, label, note=failure)
    samples, eager_samples = [], []
    with torch.no_grad():
        for _ in range(max(3, args.calls // 2)):
            if eager is not None:
                start = time.perf_counter()
                eager.call()
                eager_samples.append(time.perf_counter() - start)
            start = time.perf_counter()
            contender.call()
            samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    eager_s = statistics.median(eager_samples) if eager_samples else None
    floor = max(eager_s or 0.0, contender.streamed_bytes / disk)
    contender.close()
    if eager is not None:
        eager.close()
    return Row(workload.name, label, median, median / eager_s if eager_s else None, held, None, None,
               contender.streamed_bytes, floor,
               note=f"disk {disk / 1e9:.2f} GB/s; overlap efficiency {floor / median:.2f}; eager beside it "
                    f"{_ms(eager_s)}",
               predicted_s=contender.predicted_s)


READING = """## Reading the figures

- **On a CPU, streaming costs the copy's time.** vramfx's reader thread copies each streamed
  weight from the page cache into the arena (`pread`, about 4-6 GB/s on one core here). The
  compute kernels use every core and wait for their slowest thread, so a core taken by the copy
  slows them by about the copy's own duration: a call costs roughly eager + streamed bytes / copy
  bandwidth (the CPU cost model's `copy_interference`, calibrated with a copy running beside
  matmuls, and `copy_slowdown`, the copy's own slowing there, price it). Overlap cannot hide
  work that needs the same cores; on a GPU the copy engine is separate hardware and the same plan
  hides it (see `benchmarks/gpu_check.py`). Fewer streamed bytes is what helps on a CPU, which is
  why the planner fills the budget with resident weights first.
- **What users get.** The `vramfx compile @ X%` rows are `compile` as a user calls it, on a copy
  of the weights rewritten by `vramfx.convert(..., dtype=None)` (every tensor 64-byte aligned in
  the file): the planner then uses the weights where they lie in the page cache, with no copy,
  and their pages are file-backed (the *file* column, `RssFile`), outside the RssAnon budget the
  *held* and *peak+* columns measure. The `copying (in_place=False)` rows read the same file
  into memory vramfx owns, as on a filesystem whose mapped reads are slow; the `, bf16` rows
  store and compute in bf16 (a bf16 copy of the weights, against eager in bf16).
- **predicted** is the plan's time per call, priced with a cost model calibrated once per
  workload, after the peers are built and before the compiled rows are
  (`CostModel.calibrate(..., time_nodes=True)`: per kernel kind and dtype, a copy beside the
  kernels, and each node of the graph timed at its own shapes when it is compiled, its weights
  read from the checkpoint's pages), the page-cache link and the disk measured for the workload
  (medians of three reads), and its ratio to the measured median: the machine's speed moves by a
  third over seconds, and the ratio also says how much it moved between the seconds the nodes
  were timed and the calls.
- **The peers that look fast keep the model in RAM or map it.** accelerate `cpu_offload` on a
  CPU moves weights from the CPU to the CPU: it holds the whole model. diffusers group offloading
  from disk memory-maps the safetensors files it wrote and onloads by pointing at those pages: no
  copy at all, but the weights then live in the page cache (file-backed, not counted as RssAnon)
  and the budget is whatever the kernel leaves it; its *held* column shows the anonymous memory it
  keeps besides. vramfx in place does the same with the checkpoint's own file, and says so: the
  *file* column shows the page-cache pages it maps, and kernels see 64-byte-aligned weights
  (bit-identical results); its copying rows use only memory it owns.
- **read/call** counts bytes read through read() calls; readers that map files (accelerate's
  offload, diffusers' group offloading) read through page faults, which this column does not see.
- **Cold disk.** With `O_DIRECT` the page cache is bypassed and the disk is the link; the plan is
  priced at the disk bandwidth measured in the same run with the same reads, and the overlap
  efficiency is max(eager compute, streamed bytes / disk bandwidth) / measured time, its calls
  interleaved with eager's (whose time the note gives).
"""


def print_rows(rows: list[Row], header: str, stream: Any) -> None:
    print(f"\n== {header}", file=stream)
    print(f"{'contender':56s} {'median':>9s} {'x eager':>8s} {'held':>10s} {'peak+':>10s} {'file':>10s} "
          f"{'read/call':>10s} {'floor':>9s} {'predicted':>15s}  note", file=stream)
    for r in rows:
        print(f"{r.contender:56s} {_ms(r.median_s):>9s} {_x(r.ratio):>8s} {_b(r.held_bytes):>10s} "
              f"{_b(r.peak_growth_bytes):>10s} {_b(r.held_file_bytes):>10s} {_b(r.read_bytes_per_call):>10s} "
              f"{_ms(r.floor_s):>9s} {_predicted(r):>15s}  {r.note}", file=stream)


def _predicted(r: Row) -> str:
    """The plan's predicted time per call and its ratio to the measured median."""
    if r.predicted_s is None or not r.median_s:
        return "-"
    return f"{_ms(r.predicted_s)} ({r.predicted_s / r.median_s:.2f})"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.0f} ms"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _b(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cores": os.cpu_count(), "memory": format_bytes(mem), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "date": date.today().isoformat()}


def write_docs(rows: list[Row], info: dict[str, Any]) -> None:
    DOCS.mkdir(exist_ok=True)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/run.py` (do not edit by hand). All contenders run in one "
             "process on the same inputs, calls interleaved; figures are medians after a warm-up.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "Columns: *held* is the RssAnon a contender keeps between calls (its weights, arena, "
             "buffers); *peak+* the largest RssAnon growth during one of its calls; *file* the RssFile "
             "it adds (page-cache pages of files it maps: weights used in place, reclaimable, outside "
             "the budget); *read/call* the "
             "bytes read through read() per call (page cache or disk; mmap-based readers such as "
             "accelerate's offload show 0 here); *floor* = max(eager compute, streamed bytes / link "
             "bandwidth), the link being the page-cache read bandwidth measured in the same run (the "
             "disk bandwidth for the cold row).", ""]
    for workload in dict.fromkeys(r.workload for r in rows):
        lines += [f"## {workload}", "",
                  "| contender | median | × eager | held | peak+ | file | read/call | floor | predicted (÷ measured) | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r.workload == workload):
            lines.append(f"| {r.contender} | {_ms(r.median_s)} | {_x(r.ratio)} | {_b(r.held_bytes)} | "
                         f"{_b(r.peak_growth_bytes)} | {_b(r.held_file_bytes)} | {_b(r.read_bytes_per_call)} | {_ms(r.floor_s)} | "
                         f"{_predicted(r)} | {r.note} |")
        lines.append("")
    if chart(rows, DOCS / "benchmarks.png"):
        lines += ["![time per call relative to eager](benchmarks.png)", ""]
    lines += READING.splitlines()
    (DOCS / "benchmarks.md").write_text("\n".join(lines) + "\n")


def chart(rows: list[Row], path: Path) -> bool:
    """A bar chart of ratios to eager per workload; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'vramfx[plot]'); no chart written", file=sys.stderr)
        return False
    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        data = [(r.contender, r.ratio) for r in rows if r.workload == workload and r.ratio is not None]
        ax.barh([d[0] for d in data][::-1], [d[1] for d in data][::-1],
                color=["#2a7" if d[0].startswith("vramfx") else "#888" for d in data][::-1])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(workload)
        ax.set_xlabel("time per call / eager")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, one call: check the harness")
    parser.add_argument("--calls", type=int, default=None, help="timed rounds (default 5; 1 with --smoke)")
    parser.add_argument("--only", nargs="*", help="workload names to run (llama, flux, unet)")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip the bf16 rows (eager and vramfx at 25%% and 10%%, stored and computed in bf16)")
    args = parser.parse_args()
    args.calls = args.calls or (1 if args.smoke else 5)
    args.fractions = (0.5, 0.25, 0.1)
    args.bf16_fractions = (0.25, 0.1)
    c.CACHE.mkdir(parents=True, exist_ok=True)
    info = machine()
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    rows: list[Row] = []
    for workload in c.workloads(args.smoke):
        if args.only and workload.name not in args.only:
            continue
        rows += run_workload(workload, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2))
    if not args.smoke and not args.no_docs:
        write_docs(rows, info)


if __name__ == "__main__":
    main()
