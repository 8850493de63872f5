"""Each graph node timed at its own shapes, on the compute device, before the plan is made.

A cost model prices a node from its FLOPs and bytes at rates measured on a few kernels of fixed
shapes. A model's kernels run at other rates: a 4096-wide Linear over 8 tokens is bound by its
weight's bytes, a 64-wide attention head by dispatch, a convolution by its layout, and on a CPU
these differ by ±30% from any one calibrated figure. Plans rest on the time compute leaves for
streaming, so where predictions must hold (``CostModel.calibrate(..., time_nodes=True)``), the
planner times each distinct node instead: same op, same shapes, strides and dtypes, on random
operands, weights read from memory as a model reads them: where the weights already lie in memory
(a checkpoint's mapped pages in the page cache, or host tensors), from there, each call another
weight's bytes, so no node finds its weight in the core's cache and nothing is allocated for them.

Nodes with the same signature are timed once; the costliest signatures go first, so a time limit
leaves only cheap nodes priced by the cost model (scaled by what timing found for their kind).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx

from vramfx.plan.costs import CostModel, last_level_cache_bytes, priced_node_seconds
from vramfx.plan.liveness import compute_nodes, is_view, storage_key, tensors_of
from vramfx.plan.types import Liveness

#: Default cap on the operands (weight copies included) one node is timed with.
DEFAULT_MAX_OPERAND_BYTES = 64 << 20
#: Default seconds spent timing one graph; signatures left when it runs out stay priced.
DEFAULT_TIMING_SECONDS = 8.0
#: Samples per signature, one per pass over all signatures: passes start spread evenly over a
#: window of several of the machine's spells of load (seconds each), waiting where a pass is
#: quick, and go on until it is covered (at least _MIN_SAMPLES, at most _PASSES).
_MIN_SAMPLES, _PASSES, _WINDOW_S = 5, 12, 6.0
#: Seconds per (device, where weights were read from, signature) this process has timed.
_TIMED: dict[tuple[str, str, str], float] = {}
logger = logging.getLogger(__name__)
_SAMPLE_SECONDS = 0.002
#: Weight copies one sample cycles through; each sample starts where the last one stopped.
_MAX_WEIGHT_COPIES = 32
#: Copies a pool's slots are spread over: consecutive copies lie this far apart in its memory.
_SPREAD = 256


def node_signature(node: torch.fx.Node, weights: Collection[int] = ()) -> str | None:
    """What a node's time depends on: its op, its constants and each tensor operand's shape,
    strides and dtype (and whether it is a weight, ``weights`` being their storage keys). None
    when the node cannot be timed alone (not an aten op, or an operand that is not a tensor)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.is_view and is_view(node):
        return None  # views cost nothing worth timing; a `to` or `contiguous` that copies does
    if any(a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments):
        return None  # it would write into the weights' memory it is timed on

    def describe(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            val = value.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.is_complex() or val.is_sparse:
                raise _Untimeable
            weight = storage_key(val) in weights
            return ("T", tuple(val.shape), tuple(val.stride()), str(val.dtype), weight)
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                              torch.memory_format)):
            return repr(value)
        raise _Untimeable

    try:
        return repr((str(node.target), describe(node.args), describe(node.kwargs)))
    except _Untimeable:
        return None


def time_nodes(
    nodes: Sequence[torch.fx.Node],
    device: torch.device | str,
    *,
    order: Sequence[float] | None = None,
    seconds: float = DEFAULT_TIMING_SECONDS,
    max_operand_bytes: int = DEFAULT_MAX_OPERAND_BYTES,
    weights: Collection[int] = (),
    weight_memory: Sequence[torch.Tensor] = (),
    reuse: bool = True,
) -> tuple[float | None, ...]:
    """Seconds each of ``nodes`` takes on ``device``, or None where it was not timed.

    Parameters
    ----------
    nodes:
        Graph nodes with fake tensors in ``meta["val"]`` (a captured graph's compute nodes).
    device:
        Where to time them: the compute device.
    order:
        Per node, its priced seconds: signatures are timed costliest first (by the sum over
        their nodes), so ``seconds`` running out leaves the cheapest untimed.
    seconds:
        Time to spend in all.
    max_operand_bytes:
        The most memory one node's operands may take (weights' copies included); a node whose
        operands are larger is left untimed, so timing stays within a small part of the budget.
    weights:
        Storage keys of the weights' fake tensors: such operands are cut from memory that holds
        far more than the last-level cache, each call reading other bytes, so each call reads its
        weight from memory as a model's layer reads its own.
    weight_memory:
        Flat tensors on ``device``, each in its weights' dtype, over memory the weights already
        occupy (their file's mapped pages, host tensors): weight operands are cut from the tensors
        of their dtype, so
        they are read where, and as, the model's weights are (pages of a mapping included), and
        timing allocates nothing for them. Nothing writes to them: ops that write an operand are
        not timed. A dtype without such memory is cut from a pool allocated for the purpose, of
        half ``max_operand_bytes``, at most twice the last-level cache.
    reuse:
        Take a signature this process timed before (on this device, from the same weight memory
        or as large a pool) from then: every graph a process compiles, and every plan of one
        graph (a pipeline's components re-planned, a second budget), is priced with the same
        figures, and a later compile spends its time only on shapes not seen yet.

    Returns
    -------
    tuple
        Per signature, the median of its samples, each looping the node for at least 2 ms and
        each taken in its own pass over all signatures; passes start spread evenly over six
        seconds (twelve at most, five at least, within ``seconds``; a quick graph's passes wait
        for their turn): a shared machine's speed moves by a third in spells of a few seconds,
        so samples spread over several spells give its typical speed where samples taken back to
        back would all fall in one burst of load (or one lull). Operands are random (floats
        uniform in [0.5, 1.5), integers 0, booleans True) under a forked RNG: the caller's is
        untouched.
    """
    device = torch.device(device)
    signatures = [node_signature(n, weights) for n in nodes]
    groups: dict[str, list[int]] = {}
    for i, sig in enumerate(signatures):
        if sig is not None:
            groups.setdefault(sig, []).append(i)
    # Weights without memory of their own are cut from half the cap, at most twice the last-level
    # cache; other operands take the other half.
    pool = _WeightPool(device, min(2 * last_level_cache_bytes(), max_operand_bytes // 2) // 64 * 64, weight_memory)
    found: list[float | None] = [None] * len(nodes)
    if reuse:
        for sig in list(groups):
            known = _TIMED.get((str(device), pool.key, sig))
            if known is not None:
                for i in groups.pop(sig):
                    found[i] = known
    cost = order if order is not None else [0.0] * len(nodes)
    keys = sorted(groups, key=lambda sig: -sum(cost[i] for i in groups[sig]))
    ranked = [groups[sig] for sig in keys]
    samples: list[list[float]] = [[] for _ in ranked]
    loops: list[int] = [0] * len(ranked)
    copied: list[int] = [0] * len(ranked)  # weight copies used so far: the next sample reads on
    began = time.perf_counter()
    deadline = began + seconds
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        for round_ in range(_PASSES):
            now, start_at = time.perf_counter(), began + round_ * _WINDOW_S / _PASSES
            if round_ >= _MIN_SAMPLES and now - began >= _WINDOW_S or start_at >= deadline:
                break
            if round_ and not any(samples):
                break  # the first pass timed nothing: no later one will
            if now < start_at:
                time.sleep(start_at - now)
            for k, members in enumerate(ranked):
                if time.perf_counter() >= deadline:
                    break
                if round_ and not samples[k]:
                    continue  # failed, or not reached, in the first pass
                try:
                    taken = _sample(nodes[members[0]], device, weights, pool, max_operand_bytes // 2, loops[k],
                                    copied[k])
                except Exception:  # an op that will not run alone on random operands stays priced
                    taken = None
                if taken is not None:
                    samples[k].append(taken[0])
                    loops[k] = taken[1]
                    copied[k] += taken[1]
    for sig, members, taken in zip(keys, ranked, samples):
        median = statistics.median(taken) if taken else None
        if median is not None:
            _TIMED[(str(device), pool.key, sig)] = median
        for i in members:
            found[i] = median
    logger.info("timed %d of %d nodes (%d new signatures) on %s in %.2f s", sum(t is not None for t in found),
                len(nodes), len(groups), device, time.perf_counter() - began)
    return tuple(found)


def with_timed_nodes(
    liveness: Liveness,
    captured: Any,
    device: torch.device | str,
    cost_model: CostModel,
    *,
    seconds: float = DEFAULT_TIMING_SECONDS,
    max_operand_bytes: int = DEFAULT_MAX_OPERAND_BYTES,
    weight_memory: Sequence[torch.Tensor] = (),
) -> Liveness:
    """``liveness`` with ``timed_seconds`` from :func:`time_nodes` on ``captured``'s graph
    (weights cut from ``weight_memory`` where it has their dtype).

    A node that starts a span of a cast or decoded weight stays priced: its time includes the
    cast, which timing the node alone would leave out.
    """
    graph = captured.graph_module.graph
    nodes = compute_nodes(graph)
    placeholders = {p for w in captured.weights for p in w.placeholders}
    weight_keys = {storage_key(t) for n in graph.nodes if n.op == "placeholder" and n.name in placeholders
                   for t in tensors_of(n.meta.get("val"))}
    priced = priced_node_seconds(replace(liveness, timed_seconds=()), cost_model)
    timed = list(time_nodes(nodes, device, order=priced, seconds=seconds, max_operand_bytes=max_operand_bytes,
                            weights=weight_keys, weight_memory=weight_memory))
    for w in liveness.weights:
        if w.compute_dtype is not None:
            for begin, _ in w.spans:
                timed[begin] = None
    return replace(liveness, timed_seconds=tuple(timed))


class _Untimeable(Exception):
    """An operand that cannot be made from its fake tensor."""


def _sample(node: torch.fx.Node, device: torch.device, weights: Collection[int], pool: "_WeightPool",
            cap: int, loops: int, copied: int) -> tuple[float, int] | None:
    """One sample of ``node`` on fresh operands: seconds per call over ``loops`` calls (0: enough
    for 2 ms), and the loops used; None when the operands exceed ``cap``. Its weights are copies
    ``copied`` onwards of the pool's (those of earlier samples were read already)."""
    operands = {id(v): v.meta["val"] for v in node.all_input_nodes}
    weight_ids = [i for i, fake in operands.items() if storage_key(fake) in weights and fake.is_floating_point()]
    if sum(_nbytes(fake) for i, fake in operands.items() if i not in weight_ids) > cap:
        return None
    copies = pool.copies([operands[i] for i in weight_ids], copied)
    if copies is None:
        return None
    shared = {i: _random_like(fake, device) for i, fake in operands.items() if i not in weight_ids}
    calls = [_bound(node, {**shared, **dict(zip(weight_ids, copy))}) for copy in copies]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    calls[0]()  # the first call pays for allocation and kernel choice
    sync()
    if not loops:
        start = time.perf_counter()
        calls[-1]()
        sync()
        loops = max(1, min(1000, math.ceil(_SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-7))))
    start = time.perf_counter()
    for i in range(loops):
        calls[(i + 1) % len(calls)]()
    sync()
    return (time.perf_counter() - start) / loops, loops


class _WeightPool:
    """Where timed nodes' weight operands are cut from: so that each call reads its weight from
    memory, not from the cache an earlier call left it in, as each layer of a model reads its
    own, copies lie far apart in memory much larger than the cache, and every sample reads on
    from where the last one stopped.

    The memory is the weights' own where it holds their dtype (``weight_memory``: read where a
    model reads them, in the same pages, nothing allocated), else one buffer of ``nbytes``
    allocated once (filled with 1.0 in float32: ordinary values in every float dtype it is read
    as, so no node pays for filling its copies).
    """

    def __init__(self, device: torch.device, nbytes: int, weight_memory: Sequence[torch.Tensor] = ()) -> None:
        self.device, self.nbytes = device, nbytes
        self.buffer: torch.Tensor | None = None
        self.found: dict[tuple[torch.dtype, int], _Slots | None] = {}
        self.memory: dict[torch.dtype, list[torch.Tensor]] = {}
        for flat in weight_memory:
            self.memory.setdefault(flat.dtype, []).append(flat.reshape(-1).view(torch.uint8))
        resident = sum(t.numel() * t.element_size() for t in weight_memory)
        #: What figures timed from this pool are kept under: the weights' memory, or the pool's size.
        self.key = f"weights {resident}" if resident else f"pool {nbytes}"

    def copies(self, fakes: Sequence[torch.Tensor], copied: int = 0) -> list[list[torch.Tensor]] | None:
        """Up to ``_MAX_WEIGHT_COPIES`` sets of tensors shaped as ``fakes``, copies ``copied``
        onwards of each one's slots, or None when one of them fits nowhere."""
        if not fakes:
            return [[]]
        slots = [self._slots(fake) for fake in fakes]
        if any(s is None for s in slots):
            return None
        count = min(_MAX_WEIGHT_COPIES, min(len(s) for s in slots))  # type: ignore[arg-type]
        out = []
        for k in range(copied, copied + count):
            views = []
            for fake, found in zip(fakes, slots):
                flat = found.slot(k).view(fake.dtype)  # type: ignore[union-attr]
                views.append(flat.as_strided(tuple(fake.shape), tuple(fake.stride())))
            out.append(views)
        return out

    def _slots(self, fake: torch.Tensor) -> "_Slots | None":
        size = _align(max(_nbytes(fake), 1))
        if (fake.dtype, size) not in self.found:
            regions = [t for t in self.memory.get(fake.dtype, ()) if t.numel() >= size]
            if not regions and size <= self.nbytes:
                if self.buffer is None:
                    self.buffer = torch.ones(self.nbytes // 4, dtype=torch.float32, device=self.device).view(torch.uint8)
                regions = [self.buffer]
            self.found[fake.dtype, size] = _Slots(regions, size) if regions else None
        return self.found[fake.dtype, size]


class _Slots:
    """The ``size``-byte slots of a list of flat regions, numbered so that consecutive numbers
    lie about 1/``_SPREAD`` of the memory apart, and any ``_SPREAD`` consecutive ones differ."""

    def __init__(self, regions: Sequence[torch.Tensor], size: int) -> None:
        self.regions, self.size = regions, size
        self.starts = list(itertools.accumulate((r.numel() // size for r in regions), initial=0))
        self.total = self.starts[-1]
        self.stride = max(1, self.total // _SPREAD)

    def __len__(self) -> int:
        return self.total

    def slot(self, k: int) -> torch.Tensor:
        step, turn = k % _SPREAD, (k // _SPREAD) % self.stride
        index = (step * self.stride + turn) % self.total
        region = bisect.bisect_right(self.starts, index) - 1
        offset = (index - self.starts[region]) * self.size
        return self.regions[region][offset:offset + self.size]


def _align(nbytes: int, to: int = 64) -> int:
    return -(-nbytes // to) * to


def _bound(node: torch.fx.Node, values: dict[int, torch.Tensor]) -> Callable[[], Any]:
    """``node.target`` called on ``values`` in place of its operand nodes."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[id(n)])
    target = node.target
    return lambda: target(*args, **kwargs)


def _nbytes(t: torch.Tensor) -> int:
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) if t.numel() else 0
    return extent * t.element_size()


def _random_like(fake: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A real tensor with ``fake``'s shape, strides and dtype, filled so that every op runs on
    ordinary values (no NaN from a log or a root of a negative, indices in range)."""
    t = torch.empty_strided(tuple(fake.shape), tuple(fake.stride()), dtype=fake.dtype, device=device)
    if fake.dtype.is_floating_point:
        t.uniform_(0.5, 1.5)
    elif fake.dtype == torch.bool:
        t.fill_(True)
    else:
        t.zero_()
    return t
