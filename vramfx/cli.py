"""The ``vramfx`` command: plan a model under a budget without its weights, inspect a checkpoint.

``vramfx plan TARGET --budget 8GB`` builds the model a workload function returns (typically
with meta parameters), captures it, and plans it under the budget with the stages
``vramfx.compile`` uses — capture → liveness → schedule — then shows the plan as a table, JSON,
a Chrome trace or a PNG. Nothing is run and no weights are read (``--weights`` reads headers
only, and a scaled-fp8 file's scales). ``vramfx inspect PATH`` summarises a safetensors or GGUF
checkpoint from its headers.

Exit status: 0 on success, 2 when the budget is below the minimum (the message states the
minimum), 1 for any other error. Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vramfx.budget import parse_budget
from vramfx.errors import BudgetError, VramfxError
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness, StoredFormat
from vramfx.precision import Precision, precision_from_arguments, storage_dtypes
from vramfx.report.checkpoint import format_checkpoint, summarize_checkpoint
from vramfx.report.layers import layer_labels, module_paths
from vramfx.report.plot import plot_memory, require_matplotlib
from vramfx.report.progress import Progress
from vramfx.report.table import format_table
from vramfx.report.trace import chrome_trace
from vramfx.storage.checkpoint_keys import checkpoint_key_map
from vramfx.storage.converted import ConvertedSource
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.formats import open_weights
from vramfx.util import dtype_name, format_bytes, format_seconds
from vramfx.weights import WeightRef, resolve_weights, stored_formats
from vramfx.workload import PipelineWorkload, load_workload

if TYPE_CHECKING:
    from vramfx.capture import Captured

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BUDGET = 2

#: How many calls a plan is optimised for unless ``--calls`` says otherwise; as ``vramfx.compile``.
DEFAULT_CALLS = 10
FORMATS = ("table", "json", "chrome", "png")

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)\s*([KMGTP]?)\s*(FLOPS|FLOP/S)?\s*$", re.IGNORECASE)
_SI = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 1, leaving 2 to the budget."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``vramfx`` argument parser, one subcommand per job."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser = _Parser(prog="vramfx", description="Run PyTorch models whose weights do not fit in device memory.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="plan a model under a budget, from an empty model, without weights",
        description="Capture a model on meta tensors and plan it under a budget; nothing is run.",
    )
    plan.add_argument("target", metavar="TARGET",
                      help="path/to/file.py:function or package.module:function; the function returns "
                           "model, (model, args) or (model, args, kwargs)")
    plan.add_argument("--budget", required=True, help='device bytes: "8GB", "8GiB", "512MB", a number, or "90%%"')
    plan.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu); planning needs no GPU")
    plan.add_argument("--weights", metavar="PATH",
                      help="a safetensors file, folder or index, or a .gguf file: check its names, shapes and "
                           "dtypes match the model, and plan with the bytes it stores (quantized, scaled fp8)")
    plan.add_argument("--key-map", metavar="OLD=NEW", action="append",
                      help="rename stored keys with --weights: replace the prefix OLD by NEW (NEW may be empty: "
                           "--key-map model.diffusion_model.=); repeatable; or a .json file of {stored: name}")
    plan.add_argument("--variant", metavar="NAME",
                      help='with --weights FOLDER: read the files saved in this variant ("fp16": *.fp16.safetensors)')
    plan.add_argument("--calls", type=int, help=f"calls to optimise for (default {DEFAULT_CALLS})")
    plan.add_argument("--link-bandwidth", metavar="RATE", help='weight transfer bandwidth, e.g. "25GB/s" '
                      "(default: the device's)")
    plan.add_argument("--compute-throughput", metavar="RATE", help='e.g. "100TFLOPS" (default: the device\'s)')
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine instead of assuming the device's figures, as compile does with "
                           "CostModel.calibrate(device, time_nodes=True): kernel rates and each node timed at its "
                           "own shapes on DEVICE (which must then be here), and on cpu with --weights the link from "
                           "the page cache; takes seconds; --link-bandwidth and --compute-throughput still win")
    plan.add_argument("--storage-dtype", metavar="DTYPE",
                      help="store weights in float8_e4m3fn, float8_e5m2, bfloat16 or float16 and plan their casts "
                           "(see docs/low-precision.md)")
    plan.add_argument("--compute-dtype", metavar="DTYPE", help="compute in bfloat16, float16 or float32")
    plan.add_argument("--keep", metavar="LIST", default="auto",
                      help="comma-separated weights kept in the compute dtype with --storage-dtype: auto, minimal, "
                           "none, names or glob patterns (default auto)")
    plan.add_argument("--no-in-place", action="store_true",
                      help="on cpu with --weights: copy every weight, as compile(..., in_place=False)")
    plan.add_argument("--bypass-page-cache", action="store_true",
                      help="on cpu with --weights: read every weight with O_DIRECT, as "
                           "compile(..., bypass_page_cache=True)")
    plan.add_argument("--no-cache", action="store_true",
                      help="capture and plan without the persistent cache (also: VRAMFX_CACHE=0)")
    plan.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    plan.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout (required for png)")
    plan.set_defaults(run=run_plan)

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="summarise a safetensors or GGUF checkpoint from its headers",
        description="List a safetensors file, folder or index, or a .gguf file: tensors, stored types (dtypes, "
                    "GGUF quant types, scaled fp8) and their bytes, shards, layers, largest tensors. Reads no "
                    "tensor data.",
    )
    inspect.add_argument("path", metavar="FILE_OR_DIR")
    inspect.add_argument("--format", choices=("table", "json"), default="table")
    inspect.add_argument("--largest", type=int, default=10, metavar="N", help="largest tensors to list (default 10)")
    inspect.set_defaults(run=run_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Examples
    --------
    >>> main(["plan", "workload.py:build", "--budget", "8GB", "--device", "cuda"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    debug_handler = None
    if args.debug:  # warnings reach stderr without a handler; debug records need one
        debug_handler = logging.StreamHandler()
        debug_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        vramfx_log = logging.getLogger("vramfx")
        vramfx_log.addHandler(debug_handler)
        previous_level = vramfx_log.level
        vramfx_log.setLevel(logging.DEBUG)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # ``vramfx plan … | head``: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return EXIT_OK
    except Exception as exc:  # the command line's one boundary: every error becomes one line
        if args.debug:
            traceback.print_exc()
        code = EXIT_BUDGET if isinstance(exc, BudgetError) else EXIT_ERROR
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (VramfxError, ValueError, OSError, ImportError)):
            message = f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)"
        print(f"vramfx {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if debug_handler is not None:
            vramfx_log.removeHandler(debug_handler)
            vramfx_log.setLevel(previous_level)


def run_plan(args: argparse.Namespace) -> int:
    """``vramfx plan``: every argument checked first, then load, capture, plan, and write."""
    # Imported here: torch.export and dynamo take seconds, which inspect and bad arguments skip.
    from vramfx.capture_cache import cached_capture
    from vramfx.compiler import (DEFAULT_MARGIN_BYTES, compile_margin_bytes, link_bytes_per_s, schedule_weights,
                                 timed_if_asked)
    from vramfx.util import ALIGNMENT
    from vramfx.plan.liveness import build_liveness
    from vramfx.plan.reads import PageCacheState

    device, device_note = _device(args.device)
    if args.calibrate and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--calibrate measures the device, and CUDA is not available here: plan without "
                         "--calibrate, or with --device cpu")
    budget_bytes = _budget(args.budget, device)
    calls = DEFAULT_CALLS if args.calls is None else args.calls
    if calls < 1:
        raise ValueError(f"--calls must be >= 1, got {calls}")
    link = None if args.link_bandwidth is None else parse_rate(args.link_bandwidth, "B")
    compute = None if args.compute_throughput is None else parse_rate(args.compute_throughput, "FLOPS")
    if args.format == "png":
        require_matplotlib()
        if not args.output:
            raise ValueError("--format png needs -o FILE.png")
    _check_output(args.output)
    if args.weights and not Path(args.weights).exists():
        raise ValueError(f"--weights {args.weights}: no such file or directory")
    if (args.key_map or args.variant) and not args.weights:
        raise ValueError("--key-map and --variant apply to --weights; pass --weights PATH")
    parse_key_map(args.key_map)  # checked before anything is loaded
    alignment = ALIGNMENT[device.type]
    precision = _precision(args.storage_dtype, args.compute_dtype, args.keep)

    progress = Progress()
    with progress.stage(f"loading {args.target}"):
        workload = load_workload(args.target)
    if isinstance(workload, PipelineWorkload):
        if args.calibrate:
            raise ValueError("--calibrate plans one model; a pipeline's components are planned with the device's "
                             "figures: drop --calibrate, or plan one component's model")
        with progress.stage("planning every component of the pipeline on meta"):
            from vramfx.pipelines.report import plan_pipeline_table

            shown = plan_pipeline_table(workload, budget_bytes, device, args.budget)
        print(shown)
        return EXIT_OK
    with progress.stage(f"capturing {type(workload.model).__name__} on meta"):
        captured = cached_capture(workload.model, workload.args, workload.kwargs, device=device,
                                  dtype=precision.compute_dtype if precision else None,
                                  cache=False if args.no_cache else None)
    stored = storage_dtypes(workload.model, captured.weights, precision) if precision else None
    formats = None
    weights_note = "sizes and dtypes from the model (no weights read)"
    source_link = link_bytes_per_s(device, None)  # weights in host memory, as compile assumes without a DiskMap
    refs: dict[str, WeightRef] = {}
    with contextlib.ExitStack() as open_files:
        if args.weights:
            key_map = parse_key_map(args.key_map)
            with progress.stage("checking weights"):
                source = open_files.enter_context(open_weights(args.weights, key_map=key_map, variant=args.variant))
                weights_note, refs, formats = _check_weights(workload.model, captured, source, args.weights, stored,
                                                             device)
                stored = {name: ref.dtype for name, ref in refs.items()}
                source_link = link_bytes_per_s(device, source)
        if args.calibrate:
            with progress.stage(f"calibrating {device}"):
                cost_model, cost_notes = _calibrated(device, link, compute, source_link, refs)
        else:
            cost_model, cost_notes = _cost_model(device, link, compute, source_link, from_disk=bool(args.weights))
        with progress.stage("planning"):
            liveness = build_liveness(captured, device=device, storage_dtypes=stored, stored_formats=formats)
            # As compile plans with a model that asks for it: each node timed on DEVICE, weights read
            # from where they lie.
            liveness = timed_if_asked(liveness, captured, device, cost_model, budget_bytes, refs,
                                      in_place=not args.no_in_place and not args.bypass_page_cache)
            # As compile plans it: on CPU the margin also holds the graph and the allocator's slack,
            # and weights are used in place, copied or read with O_DIRECT as the page cache allows.
            margin_bytes = compile_margin_bytes(captured, liveness, device, DEFAULT_MARGIN_BYTES[device.type])
            page_cache = None if refs else PageCacheState(source="no weights given")
            plan = schedule_weights(liveness, refs, device=device, budget_bytes=budget_bytes, cost_model=cost_model,
                                    calls=calls, margin_bytes=margin_bytes, in_place=not args.no_in_place,
                                    bypass_page_cache=args.bypass_page_cache, page_cache=page_cache,
                                    cache=False if args.no_cache else None)
            reads_note = _reads_note(plan, refs, device, args)
    labels = layer_labels(module_paths(captured, liveness))

    title = f"{type(workload.model).__name__} on {device}"
    settings = [
        ("target", f"{args.target} → {type(workload.model).__name__}, planned on meta (nothing run)"),
        ("device", f"{device}{device_note}: alignment {alignment} B, margin {format_bytes(margin_bytes)}"),
        ("budget", f"{args.budget} = {format_bytes(budget_bytes)} ({budget_bytes} bytes)"),
        ("calls", f"{calls}{'' if args.calls is not None else ' (default)'}"),
        *cost_notes,
        ("weights", weights_note),
        *([("reads", reads_note)] if reads_note else []),
        *([("precision", _precision_note(precision, args.keep))] if precision else []),
    ]
    with progress.stage(f"writing {args.format}"):
        shown = _write(args.format, args.output, plan, liveness, labels, settings, title)
    print(shown)  # after the stage: a terminal's progress line is gone by now
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    """``vramfx inspect``: a checkpoint's tensors from its headers."""
    if not Path(args.path).exists():
        raise ValueError(f"{args.path}: no such file or directory")
    if args.largest < 0:
        raise ValueError(f"--largest must be >= 0, got {args.largest}")
    summary = summarize_checkpoint(args.path, largest=args.largest)
    if args.format == "json":
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_checkpoint(summary))
    return EXIT_OK


def parse_key_map(values: Sequence[str] | None) -> Any:
    """``--key-map`` values: ``OLD=NEW`` prefix replacements (first match wins), or one ``.json``
    file holding ``{stored key: model name}``; None when none are given.

    Examples
    --------
    >>> rename = parse_key_map(["model.diffusion_model.="])
    >>> rename("model.diffusion_model.x.weight"), rename("other")
    ('x.weight', 'other')
    """
    if not values:
        return None
    if len(values) == 1 and values[0].endswith(".json"):
        try:
            mapping = json.loads(Path(values[0]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--key-map {values[0]}: cannot read a JSON object from it ({exc})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"--key-map {values[0]}: expected a JSON object of stored key to model name")
        return mapping
    pairs = []
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old:
            raise ValueError(f"--key-map {value!r}: expected OLD=NEW (a prefix and its replacement) or a .json file")
        pairs.append((old, new))

    def rename(key: str) -> str:
        for old, new in pairs:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return rename


def parse_rate(text: str, unit: str) -> float:
    """A rate in units per second: ``"25GB/s"``, ``"25GiB/s"`` (``unit="B"``), ``"100TFLOPS"``
    (``unit="FLOPS"``), or a plain number.

    Examples
    --------
    >>> parse_rate("25GB/s", "B"), parse_rate("1.5GiB/s", "B"), parse_rate("100TFLOPS", "FLOPS")
    (25000000000.0, 1610612736.0, 100000000000000.0)
    """
    value: float | None = None
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        if unit == "B":
            if stripped.lower().endswith("/s") and "%" not in stripped:
                try:
                    value = float(parse_budget(stripped[:-2]))
                except ValueError:
                    value = None
        else:
            match = _RATE_RE.match(stripped)
            if match and match.group(3):
                value = float(match.group(1)) * _SI[match.group(2).upper()]
    if value is None or not 0 < value < math.inf:
        example = '"25GB/s", "25GiB/s" or a number of bytes per second' if unit == "B" else (
            '"100TFLOPS", "50GFLOPS" or a number of FLOP per second')
        raise ValueError(f"{text!r} is not a positive rate; expected {example}")
    return value


def _device(text: str | None) -> tuple[torch.device, str]:
    """The device to plan for, and a note on how it was chosen."""
    if text is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device()), " (default)"
        return torch.device("cpu"), " (default: no CUDA here; --device cuda plans for a GPU)"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: expected cpu or cuda (cuda:N)")
    return device, ""


def _budget(text: str, device: torch.device) -> int:
    """``--budget`` in bytes; a percentage needs the device present to measure its free memory."""
    if text.strip().endswith("%") and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--budget {text}: a percentage is of the free memory of the device, and CUDA is not "
            "available here; give bytes, e.g. --budget 8GB"
        )
    try:
        return parse_budget(int(text) if text.strip().isdigit() else text, device)
    except ValueError as exc:
        raise ValueError(f"--budget: {exc}") from None


def _cost_model(
    device: torch.device,
    link: float | None,
    compute: float | None,
    source_link: float | None,
    *,
    from_disk: bool,
) -> tuple[CostModel, list[tuple[str, str]]]:
    """The cost model ``vramfx.compile`` would plan with on ``device``, made reproducible, with the
    user's rates; and a line per rate saying where it came from.

    Compute keeps the device's fixed default, as ``compile`` does unless it is given a calibrated
    model (``--calibrate``: :func:`_calibrated`). The link is ``compile``'s for the weights' source
    (``source_link``; None keeps the device's default).
    """
    cost_model = CostModel.for_device(device, link_bytes_per_s=source_link)
    changes = {}
    if link is not None:
        changes["link_bytes_per_s"] = link
    if compute is not None:
        changes["compute_flops_per_s"] = compute
    cost_model = dataclasses.replace(cost_model, **changes)
    default = f"default for {device.type}"
    source = "weights on disk" if from_disk else "weights in host memory"
    return cost_model, _rate_notes(
        cost_model, device,
        link="(--link-bandwidth)" if link is not None else f"({default}, {source}; set with --link-bandwidth)",
        compute="(--compute-throughput)" if compute is not None else f"({default}; set with --compute-throughput)",
        memory=f"({default})",
    )


def _calibrated(
    device: torch.device,
    link: float | None,
    compute: float | None,
    source_link: float | None,
    refs: dict[str, WeightRef],
) -> tuple[CostModel, list[tuple[str, str]]]:
    """``CostModel.calibrate(device, time_nodes=True)``, the model a user passes ``compile`` to plan
    with this machine's rates, with the link measured from the weights' files on CPU (a
    :class:`vramfx.DiskMap` as ``--weights``: its page cache as it is now) and the user's rates
    over both; and a line per figure saying where it came from."""
    from vramfx.measure import link_bytes_per_s
    from vramfx.storage.diskmap import DiskMap

    disks = {id(ref.source): ref.source for ref in refs.values() if isinstance(ref.source, DiskMap)}
    measured_link = None
    if link is None and device.type == "cpu" and len(disks) == 1:
        measured_link = link_bytes_per_s(next(iter(disks.values())))
    cost_model = CostModel.calibrate(device, time_nodes=True, link_bytes_per_s=link or measured_link or source_link)
    if compute is not None:
        cost_model = dataclasses.replace(cost_model, compute_flops_per_s=compute)
    link_origin = ("--link-bandwidth" if link is not None else "measured from --weights' page cache"
                   if measured_link is not None else f"default for {device.type}; set with --link-bandwidth")
    measured = "calibrated here"
    return cost_model, _rate_notes(
        cost_model, device,
        link=f"({link_origin}), a copy beside the kernels {cost_model.copy_slowdown:.3g}× as long ({measured})",
        compute=f"({'--compute-throughput' if compute is not None else measured}); each node timed at its own "
                f"shapes on {device}",
        memory=f"({measured})",
    )


def _rate_notes(cost_model: CostModel, device: torch.device, *, link: str, compute: str,
                memory: str) -> list[tuple[str, str]]:
    """The settings lines for ``cost_model``'s figures, each followed by the text saying where it
    came from (``link``, ``compute``, ``memory``)."""
    return [
        ("link", f"{_format_rate(cost_model.link_bytes_per_s, 'B/s')} {link}"),
        ("compute", f"{_format_rate(cost_model.compute_flops_per_s, 'FLOPS')} {compute}"),
        ("memory", f"{_format_rate(cost_model.memory_bytes_per_s, 'B/s')} device memory, "
                   f"{format_seconds(cost_model.node_overhead_s)} per node, copy interference "
                   f"{cost_model.copy_interference:.3g} {memory}"),
        ("disk", f"{_format_rate(cost_model.disk_bytes_per_s, 'B/s')} for bytes the page cache does not hold "
                 f"(default for {device.type}, assumed)"),
    ]


def _reads_note(plan: Plan, refs: dict[str, WeightRef], device: torch.device, args: argparse.Namespace) -> str:
    """The settings line on how a CPU plan reads weights from their files; empty elsewhere."""
    if device.type != "cpu" or not refs:
        return ""
    forced = (" (--bypass-page-cache)" if args.bypass_page_cache else
              " (--no-in-place)" if args.no_in_place else "")
    copies = "with O_DIRECT" if plan.reads == "direct" else "through the page cache"
    return (f"{len(plan.in_place)} weights used in place ({format_bytes(plan.in_place_bytes)}, mapped file pages "
            f"outside the budget), the others copied {copies}{forced}; chosen by predicted time given the page "
            "cache now (docs/speed.md)")


def _format_rate(value: float, unit: str) -> str:
    """``25 GB/s``, ``100 TFLOPS``: decimal prefixes, as bandwidths and throughputs are quoted."""
    for prefix in ("P", "T", "G", "M", "K"):
        if value >= _SI[prefix]:
            return f"{value / _SI[prefix]:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _check_output(output: str | None) -> None:
    """Fail before any work when the output file cannot be written where asked."""
    if output is None:
        return
    parent = Path(output).resolve().parent
    if not parent.is_dir():
        raise ValueError(f"-o {output}: folder {parent} does not exist")
    if Path(output).is_dir():
        raise ValueError(f"-o {output} is a folder; give a file name")


def _check_weights(
    model: torch.nn.Module,
    captured: Captured,
    source: Any,
    path: str,
    storage: dict[str, torch.dtype] | None,
    device: torch.device,
) -> tuple[str, dict[str, WeightRef], dict[str, StoredFormat]]:
    """Check every graph weight is in ``source`` with the model's shape and dtype (or one it can be
    stored in); a line on what matched, each weight's reference (its stored dtype among what it
    says), and how the decoded ones (GGUF, scaled fp8) are stored."""
    refs = resolve_weights(captured.weights, source, renamed=checkpoint_key_map(model, source), storage=storage)
    converted = [ref for ref in refs.values() if isinstance(ref.source, ConvertedSource)]
    formats = stored_formats(refs, device)
    from_file = [ref for ref in refs.values() if _origin(ref) is source]
    unused = len(source) - len({ref.key for ref in from_file})
    nbytes = sum(ref.nbytes for ref in from_file)
    from_model = len(refs) - len(from_file)
    note = (
        f"{path}: all {len(refs)} graph weights match in name, shape and dtype "
        f"({len(from_file)} from the file, {format_bytes(nbytes)}"
        f"{f'; {len(converted)} converted to their storage dtype' if converted else ''}"
        f"{_decoded_note(formats)}"
        f"{f'; {from_model} held by the model' if from_model else ''}"
        f"{f'; {unused} stored tensor{_s(unused)} unused' if unused else ''})"
    )
    return note, refs, formats


def _decoded_note(formats: dict[str, StoredFormat]) -> str:
    """``; 140 decoded (Q4_K 112, F16 28)``: the weights whose stored bytes are decoded, by format."""
    if not formats:
        return ""
    counts = Counter(f.format for f in formats.values())
    return f"; {len(formats)} decoded ({', '.join(f'{name} {n}' for name, n in counts.most_common())})"


def _origin(ref: WeightRef) -> object:
    """The source a weight's bytes come from, before any conversion."""
    return ref.source.source if isinstance(ref.source, ConvertedSource) else ref.source


def _precision(storage: str | None, compute: str | None, keep: str) -> Precision | None:
    """``--storage-dtype``, ``--compute-dtype`` and ``--keep`` checked, as compile checks them."""
    items = None if keep.strip().lower() == "none" else [k.strip() for k in keep.split(",") if k.strip()]
    storage_dtype = _dtype_option("--storage-dtype", storage)
    compute_dtype = _dtype_option("--compute-dtype", compute)
    try:
        return precision_from_arguments(storage_dtype, compute_dtype, items)
    except ValueError as exc:
        raise ValueError(f"{exc} (--storage-dtype, --compute-dtype, --keep)") from None


def _dtype_option(option: str, text: str | None) -> torch.dtype | None:
    """A dtype named as torch names it (``bfloat16``, ``float8_e4m3fn``)."""
    if text is None:
        return None
    dtype = getattr(torch, text.strip().removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{option} {text!r}: not a torch dtype; e.g. float8_e4m3fn, bfloat16, float16, float32")
    return dtype


def _precision_note(precision: Precision, keep: str) -> str:
    """The settings line on how weights are stored and computed."""
    stored = dtype_name(precision.storage_dtype) if precision.storage_dtype else "the compute dtype"
    computed = dtype_name(precision.compute_dtype) if precision.compute_dtype else "the model's dtypes"
    kept = f", keep {keep}" if precision.storage_dtype else ""
    return f"weights stored in {stored}, computed in {computed}{kept}"


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _write(
    fmt: str,
    output: str | None,
    plan: Plan,
    liveness: Liveness,
    labels: Sequence[str],
    settings: Sequence[tuple[str, str]],
    title: str,
) -> str:
    """Render ``plan`` as ``fmt`` into ``output``; returns what stdout shows (the text, or where it went)."""
    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: format_table(plan, liveness, labels, settings=settings),
        "json": lambda: plan.to_json(indent=2),
        "chrome": lambda: json.dumps(chrome_trace(plan, liveness, labels, title=title)),
    }
    if fmt == "png":
        plot_memory(plan, liveness, labels, output, title=title)
    else:
        text = renderers[fmt]()
        if output is None:
            return text
        Path(output).write_text(text + "\n", encoding="utf-8")
    p = plan.predicted
    return (
        f"wrote {fmt} to {output}: peak {format_bytes(plan.peak_bytes)} of {format_bytes(plan.budget_bytes)}, "
        f"{format_seconds(p.seconds_per_call)} per call predicted (stall {format_seconds(p.stall_seconds)})"
    )


if __name__ == "__main__":
    sys.exit(main())
