"""Liveness: the captured graph → weight uses and activation live ranges, as plain data.

This is the only stage that knows graph structure. It builds a ``networkx.DiGraph`` over the
captured nodes, groups values by the storage they live in (a view shares its base's storage, as
the fake tensors in ``node.meta["val"]`` record), and reduces everything to a
:class:`~vramfx.plan.types.Liveness`: for each weight its byte size and use positions, for each
position the bytes of live activations. Every interval is half-open, ``[begin, end)``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence

import networkx as nx
import torch
import torch.fx

from vramfx.capture import Captured
from vramfx.plan.types import Liveness, StoredFormat, WeightLife
from vramfx.util import dtype_name

aten = torch.ops.aten

_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_LINEAR = {aten.linear.default}
_MATMUL_GENERIC = {aten.matmul.default}
_CONVS = {
    aten.convolution.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
_ATTENTION = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
}


def compute_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The nodes that get a position, in execution order: all but placeholders and the output."""
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def tensors_of(value: object) -> list[torch.Tensor]:
    """The tensors in a node's ``meta["val"]`` (a tensor, or a nested tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def storage_key(t: torch.Tensor) -> int:
    """Identity of the (fake) storage a tensor lives in; views share their base's key."""
    return t.untyped_storage()._cdata


def is_view(node: torch.fx.Node) -> bool:
    """Whether ``node``'s results all share storage with its operands, as its fake tensors say: a
    view costs no memory traffic; a ``to`` or ``contiguous`` that copies (a view op by its
    schema) does."""
    outs = tensors_of(node.meta.get("val"))
    in_keys = {storage_key(t) for i in node.all_input_nodes for t in tensors_of(i.meta.get("val"))}
    return bool(outs) and all(storage_key(t) in in_keys for t in outs)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _dense_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build_graph(graph: torch.fx.Graph) -> nx.DiGraph:
    """A DiGraph with an edge producer → consumer for every value a node reads."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def build_liveness(
    captured: Captured,
    *,
    device: torch.device | str | None = None,
    storage_dtypes: Mapping[str, torch.dtype] | None = None,
    stored_formats: Mapping[str, StoredFormat] | None = None,
) -> Liveness:
    """Reduce a captured graph to the planner's input.

    Parameters
    ----------
    captured:
        The output of :func:`vramfx.capture.capture`.
    device:
        The compute device; decides which kernels need workspace (CPU attention and
        convolution). Defaults to the device the graph was captured for.
    storage_dtypes:
        The dtype each weight is stored in, by name, where it differs from the graph's
        (low-precision storage). Such a weight is sized in its storage dtype, with its size in
        the graph's dtype beside it: each of its spans starts with a cast, whose bytes count as
        memory traffic of the span's first node (the schedule places the cast's buffer).
    stored_formats:
        Weights whose stored bytes are decoded, not only cast (GGUF blocks, scaled fp8), by
        name; they take precedence over ``storage_dtypes``. Such a weight is sized in its stored
        bytes, each span starts with a decode, whose traffic counts as the span's first node's,
        and the workspace covers the largest decode's transient memory.

    Returns
    -------
    Liveness
        Weights in order of first use; ``activation_bytes[t]`` counts each live storage once.

    Examples
    --------
    >>> from vramfx.capture import capture
    >>> live = build_liveness(capture(torch.nn.Linear(2, 3), (torch.randn(1, 2),)))
    >>> [(w.name, w.uses) for w in live.weights]
    [('bias', (0,)), ('weight', (0,))]
    """
    device = torch.device(device if device is not None else captured.device)
    graph = captured.graph_module.graph
    dag = build_graph(graph)
    nodes = compute_nodes(graph)
    position = {n.name: i for i, n in enumerate(nodes)}
    num_positions = len(nodes)
    by_name = {n.name: n for n in graph.nodes}

    weight_by_placeholder = {p: w for w in captured.weights for p in w.placeholders}
    weight_storage: dict[int, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in weight_by_placeholder:
            for t in tensors_of(node.meta.get("val")):
                weight_storage[storage_key(t)] = weight_by_placeholder[node.name].name

    # Each activation storage: bytes, first position it exists, last position that reads it.
    act_bytes: dict[int, int] = {}
    act_begin: dict[int, int] = {}
    act_end: dict[int, int] = {}
    # Each weight: positions that read it, and spans a view of it stays alive.
    weight_uses: dict[str, set[int]] = {}
    weight_spans: dict[str, list[tuple[int, int]]] = {}

    def last_reader(name: str) -> int:
        readers = [position[s] for s in dag.successors(name) if s in position]
        out = [s for s in dag.successors(name) if by_name[s].op == "output"]
        return num_positions if out else max(readers, default=-1)

    for node in graph.nodes:
        if node.op == "output":
            continue
        pos = position.get(node.name, 0)
        end = last_reader(node.name) + 1
        for t in tensors_of(node.meta.get("val")):
            key = storage_key(t)
            if key in weight_storage:
                continue
            if key not in act_bytes:
                act_bytes[key] = _storage_nbytes(t)
                act_begin[key] = pos
                act_end[key] = pos + 1
            act_end[key] = max(act_end[key], end)
        if node.op == "placeholder":
            continue
        for inp in node.all_input_nodes:
            for t in tensors_of(inp.meta.get("val")):
                name = weight_storage.get(storage_key(t))
                if name is not None:
                    weight_uses.setdefault(name, set()).add(pos)
        # A node whose output is a view of a weight keeps that weight's memory alive until the
        # view's last reader: that whole range is one span the planner may not split.
        for t in tensors_of(node.meta.get("val")):
            name = weight_storage.get(storage_key(t))
            if name is not None:
                weight_spans.setdefault(name, []).append((pos, max(pos + 1, end)))
                weight_uses[name].add(pos)
        for name in {weight_storage.get(storage_key(t)) for i in node.all_input_nodes
                     for t in tensors_of(i.meta.get("val"))} - {None}:
            weight_spans.setdefault(name, []).append((pos, pos + 1))

    activation = _profile(num_positions, act_bytes, act_begin, act_end)
    flops, memory = _costs(nodes)
    memory = list(memory)
    workspace = max((_workspace_bytes(n, device) for n in nodes), default=0)

    specs = captured.name_to_weight
    weights = []
    for name, uses in weight_uses.items():
        spec = specs[name]
        stored = (storage_dtypes or {}).get(name, spec.dtype)
        decoded = (stored_formats or {}).get(name)
        numel = math.prod(spec.shape)
        cast = decoded is not None or stored != spec.dtype
        life = WeightLife(
            name=name,
            nbytes=decoded.nbytes if decoded else numel * stored.itemsize,
            uses=tuple(sorted(uses)),
            spans=_merge(weight_spans[name]),
            shape=spec.shape,
            dtype=decoded.dtype if decoded else dtype_name(stored),
            compute_dtype=dtype_name(spec.dtype) if cast else None,
            compute_nbytes=numel * spec.dtype.itemsize if cast else 0,
            format=decoded.format if decoded else None,
        )
        traffic = decoded.traffic_bytes if decoded else life.nbytes + life.compute_nbytes
        for begin, _ in life.spans if cast else ():
            memory[begin] += traffic
        if decoded:
            workspace = max(workspace, decoded.workspace_bytes)
        weights.append(life)
    weights.sort(key=lambda w: (w.first_use, w.name))
    return Liveness(
        num_positions=num_positions,
        weights=tuple(weights),
        activation_bytes=activation,
        flops=flops,
        memory_bytes=tuple(memory),
        workspace_bytes=workspace,
        position_names=tuple(n.name for n in nodes),
        op_classes=tuple(_op_class(n) for n in nodes),
    )


def _profile(
    num_positions: int, nbytes: dict[int, int], begin: dict[int, int], end: dict[int, int]
) -> tuple[int, ...]:
    """``A(t)`` by a difference array over the half-open live ranges, then a running sum."""
    diff = [0] * (num_positions + 1)
    for key, size in nbytes.items():
        b, e = begin[key], min(end[key], num_positions)
        if e <= b:
            e = b + 1
        diff[min(b, num_positions)] += size
        diff[min(e, num_positions)] -= size
    out, running = [], 0
    for t in range(num_positions):
        running += diff[t]
        out.append(running)
    return tuple(out)


def _merge(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint half-open spans; overlapping ones are joined."""
    merged: list[list[int]] = []
    for b, e in sorted(spans):
        if merged and b < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([b, e])
    return tuple((b, e) for b, e in merged)


def _shape(node: object) -> Sequence[int] | None:
    if isinstance(node, torch.fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
    return None


def _costs(nodes: Sequence[torch.fx.Node]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """FLOPs and bytes read plus written, per position."""
    flops, memory = [], []
    for node in nodes:
        outs = tensors_of(node.meta.get("val"))
        ins = [t for i in node.all_input_nodes for t in tensors_of(i.meta.get("val"))]
        if is_view(node) or node.target is operator.getitem:
            memory.append(0)
        else:
            memory.append(sum(_dense_nbytes(t) for t in ins + outs))
        flops.append(float(_node_flops(node, outs)))
    return tuple(flops), tuple(memory)


def _node_flops(node: torch.fx.Node, outs: list[torch.Tensor]) -> float:
    """Multiply-adds ×2 of the dense ops; elementwise ops count one per output element."""
    target = node.target
    out_numel = sum(t.numel() for t in outs)
    if target in _LINEAR:
        w = _shape(node.args[1])
        return 2.0 * out_numel * (w[-1] if w else 1)
    if target in _MATMULS or target in _MATMUL_GENERIC:
        a = _shape(node.args[-2] if target in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
        return 2.0 * out_numel * (a[-1] if a else 1)
    if target in _CONVS:
        w = _shape(node.args[1])
        if not w:
            return float(out_numel)
        transposed = target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                aten.conv_transpose3d.input) or (
            target == aten.convolution.default and bool(node.args[6]))
        if transposed:
            x = _shape(node.args[0])
            return 2.0 * (math.prod(x) if x else out_numel) * math.prod(w[1:])
        return 2.0 * out_numel * math.prod(w[1:])
    if target in _ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if q and k:
            return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    return float(out_numel)


def _op_class(node: torch.fx.Node) -> str:
    """``"<kind>:<dtype>"`` for the kernels whose throughput a cost model prices apart (matmul,
    conv, attention; ``memory`` for other ops, bound by memory traffic), else ``""``."""
    target = node.target
    if target in _LINEAR or target in _MATMULS or target in _MATMUL_GENERIC:
        kind = "matmul"
    elif target in _CONVS:
        kind = "conv"
    elif target in _ATTENTION:
        kind = "attention"
    elif node.op == "call_function" and target is not operator.getitem:
        kind = "memory"  # bound by memory traffic, at a rate per dtype (bf16 converts on many CPUs)
    else:
        return ""
    outs = tensors_of(node.meta.get("val"))
    if kind == "memory":
        return f"memory:{dtype_name(outs[0].dtype)}" if outs and outs[0].is_floating_point() else ""
    return f"{kind}:{dtype_name(outs[0].dtype)}" if outs else kind


def _workspace_bytes(node: torch.fx.Node, device: torch.device) -> int:
    """Transient memory a kernel takes beyond its output, where it is large enough to matter."""
    target = node.target
    if target in _ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if q and k and len(q) >= 2:
            val = node.args[0].meta["val"]
            # Math attention materialises the score matrix; flash/efficient kernels do not.
            rows = math.prod(q[:-1]) * k[-2]
            return rows * max(4, val.element_size()) if device.type == "cpu" else 0
    if target in _CONVS and device.type == "cpu":
        w, outs = _shape(node.args[1]), tensors_of(node.meta.get("val"))
        if w and outs:
            out = outs[0]
            spatial = math.prod(out.shape[2:]) if out.dim() > 2 else 1
            # Unfolded input (im2col) plus a reordered copy of the weight.
            cols = math.prod(w[1:]) * spatial * out.shape[0] * out.element_size()
            return cols + math.prod(w) * out.element_size()
    return 0
