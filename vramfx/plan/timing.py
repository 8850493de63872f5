"""Each graph node timed at its own shapes, on the compute device, before the plan is made.

A cost model prices a node from its FLOPs and bytes at rates measured on a few kernels of fixed
shapes. A model's kernels run at other rates: a 4096-wide Linear over 8 tokens is bound by its
weight's bytes, a 64-wide attention head by dispatch, a convolution by its layout, and on a CPU
these differ by ±30% from any one calibrated figure. Plans rest on the time compute leaves for
streaming, so where predictions must hold (``CostModel.calibrate(..., time_nodes=True)``), the
planner times each distinct node instead: same op, same shapes, strides and dtypes, on random
operands, weights read out of the core's cache as a model reads them (each Linear its own weight).

Nodes with the same signature are timed once; the costliest signatures go first, so a time limit
leaves only cheap nodes priced by the cost model (scaled by what timing found for their kind).
"""

from __future__ import annotations

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
from vramfx.plan.liveness import compute_nodes, storage_key, tensors_of
from vramfx.plan.types import Liveness

#: Default cap on the operands (weight copies included) one node is timed with.
DEFAULT_MAX_OPERAND_BYTES = 64 << 20
#: Default seconds spent timing one graph; signatures left when it runs out stay priced.
DEFAULT_TIMING_SECONDS = 5.0
#: Samples per signature: at least the first, taken in as many passes as fit in the time allowed,
#: and passes go on until the window spans a few seconds of the machine's drift.
_MIN_SAMPLES, _MAX_SAMPLES, _MIN_WINDOW_S = 5, 25, 2.0
#: Seconds per (device, weight pool bytes, signature) this process has timed.
_TIMED: dict[tuple[str, int, str], float] = {}
logger = logging.getLogger(__name__)
_SAMPLE_SECONDS = 0.002
_MAX_WEIGHT_COPIES = 32


def node_signature(node: torch.fx.Node, weights: Collection[int] = ()) -> str | None:
    """What a node's time depends on: its op, its constants and each tensor operand's shape,
    strides and dtype (and whether it is a weight, ``weights`` being their storage keys). None
    when the node cannot be timed alone (not an aten op, or an operand that is not a tensor)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.is_view:
        return None  # views cost nothing worth timing

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
        Storage keys of the weights' fake tensors: such operands are cycled through copies
        totalling twice the last-level cache, so each call reads its weight from memory.
    reuse:
        Take a signature this process timed before (on this device, with as large a pool) from
        then: every graph a process compiles, and every plan of one graph (a pipeline's
        components re-planned, a second budget), is priced with the same figures, and a later
        compile spends its time only on shapes not seen yet.

    Returns
    -------
    tuple
        Per signature, the median of its samples, each looping the node for at least 2 ms and
        each taken in its own pass over all signatures, five passes or more until they span two
        seconds (at most 25, within ``seconds``): a shared machine's speed moves by a third over
        seconds, so samples spread over a window give its typical speed where samples taken back
        to back would all fall in one burst of load (or one lull). Operands are
        random (floats uniform in [0.5, 1.5), integers 0, booleans True) under a forked RNG: the
        caller's is untouched.
    """
    device = torch.device(device)
    signatures = [node_signature(n, weights) for n in nodes]
    groups: dict[str, list[int]] = {}
    for i, sig in enumerate(signatures):
        if sig is not None:
            groups.setdefault(sig, []).append(i)
    # Weights cycle through copies in half the cap, at most twice the last-level cache; other
    # operands take the other half.
    pool = _WeightPool(device, min(2 * last_level_cache_bytes(), max_operand_bytes // 2) // 64 * 64)
    found: list[float | None] = [None] * len(nodes)
    if reuse:
        for sig in list(groups):
            known = _TIMED.get((str(device), pool.nbytes, sig))
            if known is not None:
                for i in groups.pop(sig):
                    found[i] = known
    cost = order if order is not None else [0.0] * len(nodes)
    keys = sorted(groups, key=lambda sig: -sum(cost[i] for i in groups[sig]))
    ranked = [groups[sig] for sig in keys]
    samples: list[list[float]] = [[] for _ in ranked]
    loops: list[int] = [0] * len(ranked)
    began = time.perf_counter()
    deadline = began + seconds
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        for round_ in range(_MAX_SAMPLES):
            if round_ >= _MIN_SAMPLES and time.perf_counter() - began >= _MIN_WINDOW_S:
                break
            for k, members in enumerate(ranked):
                if time.perf_counter() >= deadline:
                    break
                if round_ and not samples[k]:
                    continue  # failed, or not reached, in the first pass
                try:
                    taken = _sample(nodes[members[0]], device, weights, pool, max_operand_bytes // 2, loops[k])
                except Exception:  # an op that will not run alone on random operands stays priced
                    taken = None
                if taken is not None:
                    samples[k].append(taken[0])
                    loops[k] = taken[1]
    for sig, members, taken in zip(keys, ranked, samples):
        if taken:
            _TIMED[(str(device), pool.nbytes, sig)] = statistics.median(taken)
        for i in members:
            found[i] = statistics.median(taken) if taken else None
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
) -> Liveness:
    """``liveness`` with ``timed_seconds`` from :func:`time_nodes` on ``captured``'s graph.

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
                            weights=weight_keys))
    for w in liveness.weights:
        if w.compute_dtype is not None:
            for begin, _ in w.spans:
                timed[begin] = None
    return replace(liveness, timed_seconds=tuple(timed))


class _Untimeable(Exception):
    """An operand that cannot be made from its fake tensor."""


def _sample(node: torch.fx.Node, device: torch.device, weights: Collection[int], pool: "_WeightPool",
            cap: int, loops: int) -> tuple[float, int] | None:
    """One sample of ``node`` on fresh operands: seconds per call over ``loops`` calls (0: enough
    for 2 ms), and the loops used; None when the operands exceed ``cap``."""
    operands = {id(v): v.meta["val"] for v in node.all_input_nodes}
    weight_ids = [i for i, fake in operands.items() if storage_key(fake) in weights and fake.is_floating_point()]
    if sum(_nbytes(fake) for i, fake in operands.items() if i not in weight_ids) > cap:
        return None
    copies = pool.copies([operands[i] for i in weight_ids])
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
        loops = max(len(calls), min(1000, math.ceil(_SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-7))))
    start = time.perf_counter()
    for i in range(loops):
        calls[i % len(calls)]()
    sync()
    return (time.perf_counter() - start) / loops, loops


class _WeightPool:
    """One buffer that weight operands are cut from, as many copies as fit: cycling through them,
    a timed node reads its weight from memory, not from the cache the previous call left it in,
    as each layer of a model reads its own. Filled once (with 1.0 in float32: ordinary values in
    every float dtype it is read as), so no node pays for filling its copies."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.device, self.nbytes = device, nbytes
        self.buffer: torch.Tensor | None = None

    def copies(self, fakes: Sequence[torch.Tensor]) -> list[list[torch.Tensor]] | None:
        """Up to ``_MAX_WEIGHT_COPIES`` sets of tensors shaped as ``fakes``, or None when one set
        does not fit in the pool."""
        sizes = [_align(_nbytes(f)) for f in fakes]
        total = sum(sizes)
        if not fakes:
            return [[]]
        if total > self.nbytes:
            return None
        if self.buffer is None:
            self.buffer = torch.ones(self.nbytes // 4, dtype=torch.float32, device=self.device).view(torch.uint8)
        out = []
        for k in range(min(_MAX_WEIGHT_COPIES, self.nbytes // total)):
            offset, views = k * total, []
            for fake, size in zip(fakes, sizes):
                flat = self.buffer[offset:offset + size].view(fake.dtype)
                views.append(flat.as_strided(tuple(fake.shape), tuple(fake.stride())))
                offset += size
            out.append(views)
        return out


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
