"""``vramfx.compile``: the stages wired in order — capture → liveness → schedule → rewrite → runtime.

Each stage is a function of the previous stage's output; this module only passes values along.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vramfx.adapters.binding import bind_adapters
from vramfx.adapters.hosting import install as install_adapter_hosting
from vramfx.adapters.hosting import mark_streamed
from vramfx.adapters.state import adapter_state
from vramfx.arguments import require_bool, require_call, require_device, require_int
from vramfx.budget import device_free_bytes, parse_budget
from vramfx.errors import BudgetError
from vramfx.measure import release_freed_memory
from vramfx.capture import Captured
from vramfx.capture_cache import cached_capture
from vramfx.plan_cache import cached_plan
from vramfx.compiled import CompiledGraph, CompiledModule
from vramfx.compiled_class import compiled_class
from vramfx.plan.costs import CostModel
from vramfx.plan.reads import WAYS, PageCacheState
from vramfx.plan.liveness import build_liveness
from vramfx.plan.timing import DEFAULT_MAX_OPERAND_BYTES, with_timed_nodes
from vramfx.plan.types import Liveness
from vramfx.plan.plan import Plan
from vramfx.progress import step
from vramfx.precision import KeepSpec, Precision, precision_from_arguments, storage_dtypes
from vramfx.rewrite import rewrite
from vramfx.storage.checkpoint_keys import checkpoint_key_map
from vramfx.storage.diskmap import DiskMap
from vramfx.runtime import make_engine
from vramfx.runtime.engine import ResidentStore
from vramfx.runtime.sources import host_bytes, mapped_bytes
from vramfx.util import ALIGNMENT, format_bytes
from vramfx.weights import as_source, is_disk_source, resolve_weights, stored_formats, stored_state

log = logging.getLogger(__name__)

#: Memory kept free beyond planned activations and kernel workspace: allocator rounding, small
#: temporaries, per-call bookkeeping.
DEFAULT_MARGIN_BYTES = {"cpu": 8 * 2**20, "cuda": 64 * 2**20}
#: Arena offsets are aligned so kernels see the alignment they would see in eager.
#: Bytes per second a CUDA plan assumes weights reach the device at, by where they are stored.
#: Host memory goes over PCIe from page-locked memory: 20 GB/s is what a PCIe 4 x16 link
#: sustains (PCIe 5 about twice that). DiskMap weights are read into the staging ring first, so
#: their link is the slower of PCIe and the read: 5 GB/s, a PCIe 4 NVMe drive's sequential read
#: or a warm page cache read by a few threads. A ``cost_model`` argument overrides both.
CUDA_LINK_BYTES_PER_S = {"host": 20e9, "disk": 5e9}
#: Host memory a compiled graph keeps on CPU besides what its plan counts: the captured and
#: rewritten graph modules with their node metadata, the Plan, the engine's bookkeeping, after
#: capture's temporaries are trimmed. A model's first graph also leaves state in torch's caches.
#: Measured as RssAnon growth on the test suite's eight architectures (first graph: at most
#: 1.3 MB + 14 KB per captured node; each further one about 8 KB per node; docs/reliability.md),
#: rounded up.
GRAPH_BASE_BYTES = 2**20
GRAPH_BYTES_PER_NODE = 18 * 2**10
FURTHER_GRAPH_BYTES_PER_NODE = 9 * 2**10
#: Freed activation memory the C allocator keeps on CPU, per byte of the activation peak: glibc
#: raises its mmap threshold to the largest block freed and then serves such blocks from its
#: heaps, which keep up to twice that threshold free and hold fragments besides. Measured on the
#: Llama workload of benchmarks/reliability.py: 6-11 MB beyond the plan's activations, weights
#: and workspace (activation peaks 1.2-4.7 MB), which the 8 MiB default margin plus this covers.
ALLOCATOR_SLACK_PER_ACTIVATION_BYTE = 2
#: ... and at most this much: glibc serves blocks above 32 MiB (its mmap threshold's ceiling) by
#: mmap and returns them when freed, and trims its heap once more than twice that is free at its top.
ALLOCATOR_SLACK_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class CompileOptions:
    """The settings every input signature of one compiled model is planned with."""

    budget_bytes: int
    device: torch.device
    calls: int
    cost_model: CostModel
    margin_bytes: int
    bypass_page_cache: bool
    precision: Precision | None = None
    cache: bool | None = None
    in_place: bool = True
    page_cache: PageCacheState | None = None


def compile(model: torch.nn.Module | type[torch.nn.Module], *args: Any, **kwargs: Any) -> CompiledModule:
    """Compile ``model`` to run under ``budget`` bytes of device memory.

    ``vramfx.compile(ModelClass, folder, budget=...)`` reads a saved model folder instead and is
    :func:`vramfx.from_pretrained`.

    Parameters
    ----------
    model:
        The model, typically built under :func:`vramfx.skip_model_initialization` so its
        parameters are meta. Real parameters and buffers are used as they are, from host memory.
    budget:
        Bytes of device memory for weights, activations and workspace: an int, ``"8GB"``,
        ``"8GiB"``, ``"512MB"``, or ``"90%"`` of the device's free memory.
    weights:
        Where meta parameters come from, by state-dict name: a :class:`vramfx.DiskMap`, a path
        (file, folder, shard list or ``*.index.json``) that becomes one, a
        :class:`vramfx.GGUFMap` or a ``.gguf`` path, or a Mapping of tensors. A scaled-fp8
        checkpoint (names with ``*.scale_weight``/``*.weight_scale``) is read with its scales.
        GGUF and scaled-fp8 weights move and stay resident as stored and are decoded by the
        plan's cast steps (``docs/quantized.md``); ``storage_dtype`` does not apply to them.
        On CPU, DiskMap tensors whose data is 64-byte aligned in their file are used in place
        from the page cache, outside the budget (mapped file pages are not RssAnon;
        ``plan.in_place``, ``docs/speed.md``); :func:`vramfx.convert` with ``dtype=None``
        writes such files.
    device:
        The compute device; CUDA when available, else CPU.
    example_args, example_kwargs:
        An example call. When given, capture and planning happen now, so a
        :class:`~vramfx.BudgetError` surfaces here; otherwise they happen on the first call.
    calls:
        How many calls the plan is optimised for (a diffusion loop calls 20–50 times): weights
        kept resident are loaded once, streamed ones on every call.
    cost_model:
        Link bandwidth and compute throughput the schedule assumes. By default the device type's
        fixed figures (:meth:`CostModel.for_device`; on CUDA the link is
        :data:`CUDA_LINK_BYTES_PER_S` by where the weights are stored), so the same model,
        inputs and budget give the same plan on every machine;
        ``CostModel.calibrate(device, link_bytes_per_s=...)`` measures this one instead.
    margin_bytes:
        Memory the plan keeps free beyond activations and kernel workspace.
    bypass_page_cache:
        Read weight files with ``O_DIRECT``, for models larger than RAM: nothing is used in
        place from the page cache (:func:`vramfx.measure.link_bytes_per_s` measures the disk,
        for a calibrated ``cost_model``).
    storage_dtype:
        Hold floating-point parameters in this dtype (``torch.float8_e4m3fn``, ``float8_e5m2``,
        ``bfloat16``, ``float16``) on disk, in host memory, in transit and resident, and cast
        each to the compute dtype right before the nodes that read it. Weights a file already
        holds in it are read as they are; others are converted once, into host memory
        (:func:`vramfx.convert` converts a checkpoint on disk instead).
    compute_dtype:
        The dtype the model computes in: floating-point parameters and buffers are used as
        after ``model.to(compute_dtype)``, and inputs must be in it too. By default each weight
        computes in the dtype the model declares.
    keep_in_compute_dtype:
        Parameters held in the compute dtype instead of ``storage_dtype``: ``"auto"`` (norms,
        embeddings, biases and other small tensors, positional and patch embeddings, modulation
        layers, and the layers the model declares sensitive; see ``docs/low-precision.md``),
        ``"minimal"`` (the same without the name patterns), weight or module names, glob
        patterns, ``nn.Module`` classes, or a list mixing them; ``None`` keeps nothing. The
        module-level path (fallback, ``generate``) stores and computes the same way.
    cache:
        Read and write captures and plans in the persistent cache (:mod:`vramfx.capture_cache`,
        :mod:`vramfx.plan_cache`), so a new process compiling the same model for the same call
        skips ``torch.export`` and, with the same budget and settings, the schedule.
        ``None`` (the default) follows the environment: on unless ``VRAMFX_CACHE=0``.
    in_place:
        On CPU, use weights 64-byte aligned in a DiskMap file where they lie in the page cache
        (the default); ``False`` copies every streamed weight into the arena, as with weights
        on a filesystem whose mapped reads are slow. Whether each weight is then used in place,
        copied through the page cache or read with ``O_DIRECT`` is the plan's choice, by
        predicted time (:mod:`vramfx.plan.reads`), given what the page cache holds.
    page_cache:
        On CPU, what the page cache holds of the weights' files, for that choice
        (:class:`vramfx.plan.reads.PageCacheState`); by default measured when a graph is planned
        (``mincore`` on Linux; elsewhere every file counts as cached).

    Returns
    -------
    CompiledModule
        Called like ``model``; returns the same output structure. An instance of the model's own
        class too (:mod:`vramfx.compiled_class`), so pipelines take it in the model's place.
        Inference only: calls run without grad, one at a time.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value; the message names it. Checked before anything
        is opened or allocated.
    BudgetError
        No schedule fits (carries ``minimum_bytes``), here or, for a model that cannot be
        captured, on the module-level path it falls back to.
    WeightsError
        Missing weights, or weights whose shape or dtype differ from the model.
    Exception
        With an example call, whatever the model raises on it while it is captured (a wrong
        shape, a hook's error): eager raises it too.

    Warns
    -----
    UserWarning
        Once, naming the cause, when ``torch.export`` cannot express the model on a call's input
        signature (data-dependent control flow, an op without a meta kernel, an object it cannot
        carry). Calls with that signature then run the model eagerly, module by module, each
        module's weights fetched along the recorded module order under the same budget
        (:mod:`vramfx.swap.fallback`): the same outputs, at the layer-swap path's speed. Other
        signatures keep their graphs. ``fast.generate(...)`` always takes that path. Cache
        objects a call passes or returns (a ``DynamicCache``) stay on the compiled path.

    Examples
    --------
    A model built empty, its weights from a mapping (a DiskMap of a checkpoint works the same):

    >>> import vramfx
    >>> with vramfx.skip_model_initialization():
    ...     model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    >>> weights = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    >>> fast = vramfx.compile(model, budget="12MiB", weights=weights, device="cpu")
    >>> fast(torch.randn(2, 64)).shape
    torch.Size([2, 64])

    Weights stored in fp8, computed in bf16 (inputs in bf16 too):

    >>> fast = vramfx.compile(model, budget="12MiB", weights=weights, device="cpu",
    ...                       storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    >>> fast(torch.randn(2, 64, dtype=torch.bfloat16)).dtype
    torch.bfloat16
    """
    if isinstance(model, type):
        from vramfx.pretrained import from_pretrained

        return from_pretrained(model, *args, **kwargs)
    return compile_model(model, *args, **kwargs)


def compile_model(
    model: torch.nn.Module,
    budget: int | str,
    *,
    weights: Mapping[str, torch.Tensor] | str | os.PathLike | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    example_args: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    calls: int = 10,
    cost_model: CostModel | None = None,
    margin_bytes: int | None = None,
    bypass_page_cache: bool = False,
    storage_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    keep_in_compute_dtype: KeepSpec = "auto",
    cache: bool | None = None,
    in_place: bool = True,
    page_cache: PageCacheState | None = None,
) -> CompiledModule:
    """:func:`compile` for a model instance (the class form goes to :func:`vramfx.from_pretrained`)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    require_int("calls", calls, minimum=1)
    if margin_bytes is not None:
        require_int("margin_bytes", margin_bytes, minimum=0)
    require_bool("bypass_page_cache", bypass_page_cache)
    if cache is not None:
        require_bool("cache", cache)
    require_bool("in_place", in_place)
    if page_cache is not None and not isinstance(page_cache, PageCacheState):
        raise TypeError(f"page_cache must be a vramfx.plan.reads.PageCacheState or None, got {type(page_cache).__name__}")
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a vramfx.CostModel or None, got {type(cost_model).__name__}")
    example = require_call(example_args, example_kwargs)
    precision = precision_from_arguments(storage_dtype, compute_dtype, keep_in_compute_dtype)
    device = _resolve_device(device)
    budget_bytes = parse_budget(budget, device)
    source = as_source(weights)
    options = CompileOptions(
        budget_bytes=budget_bytes,
        device=device,
        calls=calls,
        cost_model=cost_model or CostModel.for_device(device, link_bytes_per_s=link_bytes_per_s(device, source)),
        margin_bytes=DEFAULT_MARGIN_BYTES.get(device.type, 0) if margin_bytes is None else margin_bytes,
        bypass_page_cache=bypass_page_cache,
        precision=precision,
        cache=cache,
        in_place=in_place,
        page_cache=page_cache,
    )

    renamed = checkpoint_key_map(model, source) if isinstance(source, Mapping) else {}
    mark_streamed(p for p in model.parameters() if p.is_meta)  # adapters added later stay on the host
    install_adapter_hosting()

    def build(args: tuple, kwargs: dict[str, Any], store: ResidentStore, held_bytes: int) -> CompiledGraph:
        return build_graph(model, args, kwargs, source, renamed, options, store, held_bytes)

    def replan(captured: Captured, store: ResidentStore, held_bytes: int, graph_bytes: int) -> CompiledGraph:
        with step(f"planning {type(model).__name__}"):
            return plan_graph(model, captured, source, renamed, options, store, held_bytes, graph_bytes)

    def read_state() -> dict[str, torch.Tensor]:
        return stored_state(model, source, renamed=renamed, compute_dtype=compute_dtype)

    try:
        cls = compiled_class(type(model))
    except TypeError as exc:  # a class that cannot be subclassed so: the plain wrapper still runs it
        log.info("%s; the compiled model is a plain CompiledModule", exc)
        cls = CompiledModule
    compiled = cls(
        model,
        device,
        build,
        replan=replan,
        module_path=lambda: module_path(model, source, options),
        dtype=compute_dtype,
        stored_state=read_state,
        adapter_state=lambda: adapter_state(model),
        budget_bytes=budget_bytes,
    )
    if example is not None:
        compiled.prepare(*example)
    return compiled


# What help() and editors show: the instance form's arguments.
compile.__signature__ = inspect.signature(compile_model)  # type: ignore[attr-defined]


def build_graph(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    source: Any,
    renamed: Mapping[str, str],
    options: CompileOptions,
    store: ResidentStore,
    held_bytes: int = 0,
) -> CompiledGraph:
    """Run every stage for one input signature (``renamed``: model name → checkpoint key).

    ``held_bytes``: host memory the compiled model's other graphs hold (:func:`graph_host_bytes`).
    """
    precision = options.precision
    compute_dtype = precision.compute_dtype if precision is not None else None
    with step(f"capturing {type(model).__name__}"):
        captured = cached_capture(model, args, kwargs, device=options.device, dtype=compute_dtype, cache=options.cache)
    graph_bytes = graph_host_bytes(captured, options.device, first=not held_bytes)
    with step(f"planning {type(model).__name__}"):
        return plan_graph(model, captured, source, renamed, options, store, held_bytes, graph_bytes)


def plan_graph(
    model: torch.nn.Module,
    captured: Captured,
    source: Any,
    renamed: Mapping[str, str],
    options: CompileOptions,
    store: ResidentStore,
    held_bytes: int,
    graph_bytes: int,
) -> CompiledGraph:
    """Every stage after capture: weights, liveness, schedule, rewrite, engine.

    On CPU, where the budget is what the process grows by, the plan's margin also sets aside the
    host memory compiled graphs hold outside their plans, this one's (``graph_bytes``) and the
    others' (``held_bytes``), and the freed activation memory the C allocator keeps.
    """
    precision = options.precision
    storage = storage_dtypes(model, captured.weights, precision) if precision is not None else None
    refs = resolve_weights(captured.weights, source, renamed=renamed, storage=storage)
    refs, adapters = bind_adapters(adapter_state(model), captured, refs, options.device)
    stored = {name: ref.dtype for name, ref in refs.items()}
    liveness = build_liveness(
        captured, device=options.device, storage_dtypes=stored, stored_formats=stored_formats(refs, options.device)
    )
    liveness = timed_if_asked(liveness, captured, options.device, options.cost_model, options.budget_bytes, refs,
                              in_place=options.in_place and not options.bypass_page_cache)
    reserved = held_bytes + graph_bytes
    slack = allocator_slack_bytes(liveness, options.device)
    try:
        plan = schedule_weights(
            liveness,
            refs,
            device=options.device,
            budget_bytes=options.budget_bytes,
            cost_model=options.cost_model,
            calls=options.calls,
            margin_bytes=options.margin_bytes + reserved + slack,
            in_place=options.in_place,
            bypass_page_cache=options.bypass_page_cache,
            page_cache=options.page_cache,
            cache=options.cache,
        )
    except BudgetError as exc:
        if not reserved + slack:
            raise
        raise BudgetError(
            f"{exc} Besides margin_bytes ({format_bytes(options.margin_bytes)}), the margin counts host "
            f"memory measured outside the plan: {format_bytes(reserved)} the compiled graphs hold (graph "
            f"modules, node metadata, bookkeeping) and {format_bytes(slack)} of freed activations the C "
            f"allocator keeps (see docs/reliability.md).",
            minimum_bytes=exc.minimum_bytes,
        ) from None
    if log.isEnabledFor(logging.INFO):
        log.info("vramfx plan for %s:\n%s", type(model).__name__, plan.summary())
    graph_module = rewrite(captured, plan)
    engine = make_engine(plan, refs, options.device, store,
                         bypass_page_cache=options.bypass_page_cache or plan.reads == "direct")
    if options.device.type == "cpu":
        # Capture's temporaries are freed by now, but the C allocator keeps freed pages (RssAnon,
        # what a CPU budget is measured by) until trimmed; trimmed, the arena can reuse them.
        release_freed_memory()
    return CompiledGraph(
        captured, plan, graph_module, engine, graph_bytes=graph_bytes, reserved_bytes=reserved, adapters=adapters
    )


def timed_if_asked(liveness: Liveness, captured: Captured, device: torch.device, cost_model: CostModel,
                   budget_bytes: int, refs: Mapping[str, Any] | None = None, *, in_place: bool = True) -> Liveness:
    """``liveness`` with its nodes timed at their own shapes when ``cost_model.time_nodes`` asks for
    it (:mod:`vramfx.plan.timing`), their operands kept to an eighth of the budget and their
    weights read from the memory the weights ``refs`` already occupy (:func:`weight_memory`).
    A plan that uses no weight in place (``in_place=False``) keeps no file mapped for it."""
    if not cost_model.time_nodes:
        return liveness
    cap = min(DEFAULT_MAX_OPERAND_BYTES, budget_bytes // 8)
    refs = refs or {}
    try:
        memory = weight_memory(refs, device)
        return with_timed_nodes(liveness, captured, device, cost_model, max_operand_bytes=cap, weight_memory=memory)
    finally:
        if not in_place:
            disk_maps = {id(r.source): r.source for r in refs.values() if isinstance(r.source, DiskMap)}
            for source in disk_maps.values():
                source.unmap()


def weight_memory(refs: Mapping[str, Any], device: torch.device) -> list[torch.Tensor]:
    """The memory the weights ``refs`` already occupy on a CPU, one tensor of its stored dtype per
    weight, for nodes to be timed on as the model will run them: host tensors, and the mapped
    pages of checkpoint files that the page cache holds whole (other pages would time a read
    from disk, and fill the cache). Empty on other devices."""
    if device.type != "cpu" or not refs:
        return []
    cached = dict(page_cache_state(refs).cached)
    memory = []
    for name, ref in refs.items():
        data = host_bytes(ref)
        if data is None and cached.get(name, 1.0) >= 1.0:
            data = mapped_bytes(ref)
        if data is not None and data.numel() % ref.dtype.itemsize == 0:
            memory.append(data.view(ref.dtype))
    return memory


def schedule_weights(
    liveness: Liveness,
    refs: Mapping[str, Any],
    *,
    device: torch.device,
    budget_bytes: int,
    cost_model: CostModel,
    calls: int,
    margin_bytes: int,
    in_place: bool = True,
    bypass_page_cache: bool = False,
    page_cache: PageCacheState | None = None,
    cache: bool | None = None,
) -> Plan:
    """The plan compile makes (and ``vramfx plan`` shows) for weights ``refs``, through the plan
    cache (``cache`` as :func:`vramfx.plan_cache.cached_plan`): on CPU with how each weight is read
    chosen by :func:`vramfx.plan.reads.schedule_reads` (``bypass_page_cache`` forces ``O_DIRECT``,
    ``in_place=False`` copies), given ``page_cache`` or, when None, what :func:`page_cache_state`
    measures now."""
    alignment = ALIGNMENT.get(device.type, 64)
    if device.type != "cpu":
        return cached_plan(liveness, budget_bytes, cost_model=cost_model, calls=calls, alignment=alignment,
                           margin_bytes=margin_bytes, cache=cache)
    if bypass_page_cache:
        ways: tuple[str, ...] = ("direct",)
    else:
        ways = WAYS if in_place else tuple(w for w in WAYS if w != "in place")
    mappable = {name for name, ref in refs.items() if mapped_bytes(ref) is not None} if "in place" in ways else set()
    return cached_plan(
        liveness,
        budget_bytes,
        cost_model=cost_model,
        calls=calls,
        alignment=alignment,
        margin_bytes=margin_bytes,
        ways=ways,
        mappable=mappable,
        page_cache=page_cache_state(refs) if page_cache is None else page_cache,
        cache=cache,
    )


def page_cache_state(refs: Mapping[str, Any]) -> PageCacheState:
    """What the page cache holds now of the files the weights ``refs`` are read from (DiskMap
    weights, by ``mincore``), and the memory available to it (``MemAvailable``); weights of other
    sources, and every weight where this cannot be asked, count as cached."""
    by_source: dict[int, tuple[DiskMap, dict[str, str]]] = {}
    for name, ref in refs.items():
        if isinstance(ref.source, DiskMap):
            by_source.setdefault(id(ref.source), (ref.source, {}))[1][ref.key] = name
    cached: dict[str, float] = {}
    for source, names in by_source.values():
        fractions = source.cached_fractions(names)
        if fractions is None:
            return PageCacheState(source="unknown here (no mincore): assumed cached")
        cached.update({names[key]: fraction for key, fraction in fractions.items()})
    return PageCacheState(cached=cached, available_bytes=device_free_bytes("cpu"), source="measured (mincore)")


def allocator_slack_bytes(liveness: Liveness, device: torch.device) -> int:
    """Freed activation memory the C allocator keeps, on CPU: :data:`ALLOCATOR_SLACK_PER_ACTIVATION_BYTE`
    times the activation peak, at most :data:`ALLOCATOR_SLACK_MAX_BYTES`."""
    if device.type != "cpu":
        return 0
    return min(ALLOCATOR_SLACK_PER_ACTIVATION_BYTE * liveness.activation_peak_bytes, ALLOCATOR_SLACK_MAX_BYTES)


def compile_margin_bytes(captured: Captured, liveness: Liveness, device: torch.device, margin_bytes: int) -> int:
    """The margin compile plans a model's first graph with: ``margin_bytes`` plus, on CPU, the
    graph's host memory and the allocator's slack (for tools that plan as compile does)."""
    return margin_bytes + graph_host_bytes(captured, device) + allocator_slack_bytes(liveness, device)


def graph_host_bytes(captured: Captured, device: torch.device, *, first: bool = True) -> int:
    """Host memory a compiled graph holds outside its plan, on CPU (where the budget is host
    memory): for a model's ``first`` graph :data:`GRAPH_BASE_BYTES` + :data:`GRAPH_BYTES_PER_NODE`
    per captured node, for a further one :data:`FURTHER_GRAPH_BYTES_PER_NODE` per node."""
    if device.type != "cpu":
        return 0
    nodes = len(captured.graph_module.graph.nodes)
    return GRAPH_BASE_BYTES + GRAPH_BYTES_PER_NODE * nodes if first else FURTHER_GRAPH_BYTES_PER_NODE * nodes


def module_path(model: torch.nn.Module, source: Any, options: CompileOptions) -> Any:
    """The model run module by module under the same budget: capture's fallback, and ``generate``."""
    from vramfx.swap.fallback import ModulePath  # the one place the compiled path reaches the swap path

    return ModulePath(
        model,
        source,
        device=options.device,
        budget_bytes=options.budget_bytes,
        margin_bytes=options.margin_bytes,
        calls=options.calls,
        bypass_page_cache=options.bypass_page_cache,
        precision=options.precision,
    )


def link_bytes_per_s(device: torch.device, source: Any) -> float | None:
    """The link bandwidth a plan assumes for weights from ``source``; None keeps the device's
    default (CPU: the reader's copy from the page cache)."""
    if device.type != "cuda":
        return None
    pcie = CUDA_LINK_BYTES_PER_S["host"]
    return min(pcie, CUDA_LINK_BYTES_PER_S["disk"]) if is_disk_source(source) else pcie


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = require_device("device", device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device
