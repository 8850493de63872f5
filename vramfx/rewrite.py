"""Rewrite: a captured graph and its Plan → a GraphModule that runs the plan's steps.

Weight placeholders are removed. The new graph's first input is the engine; resident weights are
read from it once at the top, and every streamed weight use reads the output of the ``wait`` of
the transfer that covers that use. ``fetch``/``wait``/``drop`` become ordinary ``call_function``
nodes at their planned positions, so the schedule is visible in the graph and in its code.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx

from vramfx.capture import Captured
from vramfx.plan.liveness import compute_nodes
from vramfx.plan.plan import Plan
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
    >>> gm = rewrite(captured, plan)
    >>> outputs = gm(engine, *pytree.tree_leaves((args, kwargs)))
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

    for name in plan.resident:
        with graph.inserting_before(anchor_top):
            value = graph.call_function(ops.resident, (engine, name))
        value.meta["vramfx"] = {"op": "resident", "name": name}
        for placeholder in weight_nodes[name]:
            placeholder.replace_all_uses_with(value)

    # covering[name] = [(wait, drop, tensor node)] for every transfer that carries the weight.
    covering: dict[str, list[tuple[int, int, torch.fx.Node]]] = defaultdict(list)
    by_position: dict[int, list[tuple[int, str, object]]] = defaultdict(list)
    for tr in plan.transfers:
        by_position[tr.drop].append((0, "drop", tr))
        by_position[tr.fetch].append((1, "fetch", tr))
        by_position[tr.wait].append((2, "wait", tr))
    for pos in sorted(by_position):
        anchor = nodes[pos] if pos < len(nodes) else output_node
        for _, op, tr in sorted(by_position[pos], key=lambda s: (s[0], s[2].id)):
            with graph.inserting_before(anchor):
                node = graph.call_function(getattr(ops, op), (engine, tr.id))
                node.meta["vramfx"] = {"op": op, "transfer": tr.id, "names": tr.names}
                # A failing step is reported with the model code of the node it runs before.
                if "stack_trace" in anchor.meta:
                    node.meta["stack_trace"] = anchor.meta["stack_trace"]
                if op == "wait":
                    for i, name in enumerate(tr.names):
                        item = graph.call_function(operator.getitem, (node, i))
                        item.meta["vramfx"] = {"op": "weight", "name": name, "transfer": tr.id}
                        item.meta["val"] = weight_nodes[name][0].meta.get("val")
                        covering[name].append((tr.wait, tr.drop, item))

    for name, tied in weight_nodes.items():
        for placeholder in tied:
            for user in list(placeholder.users):
                pos = position[user]
                item = next((it for w, d, it in covering[name] if w <= pos < d), None)
                assert item is not None, f"no transfer covers {name} at position {pos}"
                user.replace_input_with(placeholder, item)
            graph.erase_node(placeholder)

    graph.lint()
    gm = torch.fx.GraphModule(captured.graph_module, graph)
    gm.meta["vramfx_plan"] = plan
    return gm
