"""Rewrite: a captured graph and its Plan → a GraphModule that runs the plan's steps.

Weight placeholders are removed. The new graph's first input is the engine; resident weights are
read from it once at the top, and every streamed weight use reads the output of the ``wait`` of
the transfer that covers that use. ``fetch``/``wait``/``drop`` become ordinary ``call_function``
nodes at their planned positions, so the schedule is visible in the graph and in its code. A
weight stored in a low dtype is read through a ``cast`` node at the start of each span of its uses,
right after the ``wait`` (or the ``resident`` read) that brings its stored bytes; for a weight
whose stored bytes are decoded (GGUF blocks, scaled fp8), that ``cast`` decodes them.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx

from vramfx.capture import Captured
from vramfx.plan.liveness import compute_nodes
from vramfx.plan.plan import STEP_ORDER, Plan, PlannedWeight, Transfer
from vramfx.runtime import ops

ENGINE_INPUT = "vramfx_engine"


def rewrite(captured: Captured, plan: Plan) -> torch.fx.GraphModule:
    """Insert the plan's steps into a copy of the captured graph.

    Parameters
    ----------
    captured:
        The graph the plan was made for; it is not modified.
    plan:
        A checked plan whose positions refer to ``compute_nodes(captured.graph_module.graph)``.

    Returns
    -------
    torch.fx.GraphModule
        Called as ``gm(engine, *flat_user_inputs)``; returns the flat user outputs.

    Examples
    --------
    >>> gm = rewrite(captured, plan)  # doctest: +SKIP
    >>> outputs = gm(engine, *pytree.tree_leaves((args, kwargs)))  # doctest: +SKIP
    """
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(captured.graph_module.graph, value_map)
    graph.output(output)
    nodes = compute_nodes(graph)
    assert len(nodes) == plan.num_positions, "plan positions do not match the graph"
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    weight_nodes = {w.name: [placeholders[p] for p in w.placeholders] for w in captured.weights}
    position = {n: i for i, n in enumerate(nodes)}
    output_node = next(n for n in reversed(graph.nodes) if n.op == "output")

    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        engine = graph.placeholder(ENGINE_INPUT)
    anchor_top = nodes[0] if nodes else output_node

    planned = plan.name_to_weight
    # covering[name] = [(begin, end, tensor node)] for every node that provides the stored weight
    # over positions [begin, end): its resident read or a transfer's wait; cast_to[name] the same
    # for its casts to the compute dtype, which take precedence where there are any.
    covering: dict[str, list[tuple[int, int, torch.fx.Node]]] = defaultdict(list)
    cast_to: dict[str, list[tuple[int, int, torch.fx.Node]]] = defaultdict(list)
    for name in plan.resident:
        with graph.inserting_before(anchor_top):
            value = graph.call_function(ops.resident, (engine, name))
        value.meta["vramfx"] = {"op": "resident", "name": name}
        value.meta["val"] = _stored_val(weight_nodes[name][0], planned[name])
        covering[name].append((0, plan.num_positions, value))

    by_position: dict[int, list[tuple[int, str, object]]] = defaultdict(list)
    for tr in plan.transfers:
        for op in ("drop", "fetch", "wait"):
            by_position[getattr(tr, op)].append((STEP_ORDER[op], op, tr))
    for index, c in enumerate(plan.casts):
        by_position[c.position].append((STEP_ORDER["cast"], "cast", (index, c)))
    for pos in sorted(by_position):
        anchor = nodes[pos] if pos < len(nodes) else output_node
        for _, op, step in sorted(by_position[pos], key=lambda s: (s[0], _step_key(s[2]))):
            with graph.inserting_before(anchor):
                if op == "cast":
                    index, c = step
                    stored = _provider(covering[c.name], c.name, pos)
                    node = graph.call_function(ops.cast, (engine, stored, index))
                    node.meta["vramfx"] = {"op": "cast", "name": c.name, "cast": index, "end": c.end}
                    node.meta["val"] = weight_nodes[c.name][0].meta.get("val")
                    cast_to[c.name].append((c.position, c.end, node))
                else:
                    node = graph.call_function(getattr(ops, op), (engine, step.id))
                    node.meta["vramfx"] = {"op": op, "transfer": step.id, "names": step.names}
                # A failing step is reported with the model code of the node it runs before.
                if "stack_trace" in anchor.meta:
                    node.meta["stack_trace"] = anchor.meta["stack_trace"]
                if op == "wait":
                    for i, name in enumerate(step.names):
                        item = graph.call_function(operator.getitem, (node, i))
                        item.meta["vramfx"] = {"op": "weight", "name": name, "transfer": step.id}
                        item.meta["val"] = _stored_val(weight_nodes[name][0], planned[name])
                        covering[name].append((step.wait, step.drop, item))

    for name, tied in weight_nodes.items():
        for placeholder in tied:
            for user in list(placeholder.users):
                pos = position[user]
                provides = cast_to[name] if name in cast_to else covering[name]
                user.replace_input_with(placeholder, _provider(provides, name, pos))
            graph.erase_node(placeholder)

    graph.lint()
    gm = torch.fx.GraphModule(captured.graph_module, graph)
    gm.meta["vramfx_plan"] = plan
    return gm


def _step_key(step: object) -> int:
    """Order of steps at one position: transfers by id, casts by their index in the plan."""
    return step.id if isinstance(step, Transfer) else step[0]


def _provider(providers: list[tuple[int, int, torch.fx.Node]], name: str, pos: int) -> torch.fx.Node:
    """The node among ``providers`` whose range ``[begin, end)`` holds ``pos``."""
    node = next((n for begin, end, n in providers if begin <= pos < end), None)
    assert node is not None, f"nothing provides {name} at position {pos}"
    return node


def _stored_val(placeholder: torch.fx.Node, weight: PlannedWeight) -> object:
    """The placeholder's ``val`` as the runtime provides it: in the weight's storage dtype, or
    the flat run of stored bytes a decoded weight moves as."""
    val = placeholder.meta.get("val")
    if weight.compute_dtype is None or not isinstance(val, torch.Tensor):
        return val
    dtype = getattr(torch, weight.dtype)
    if weight.format is not None:
        return torch.empty(weight.nbytes // dtype.itemsize, dtype=dtype, device="meta")
    return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device="meta")
