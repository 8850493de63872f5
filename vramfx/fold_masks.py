"""Constant attention masks folded into SDPA's own flags, as eager passes them.

Without a padding mask, transformers calls ``scaled_dot_product_attention`` with
``is_causal=True`` (or no mask) in eager, so a GPU runs its flash kernel. Under ``torch.export``
it cannot look at values, so it builds the mask in the graph from ``arange``s instead, and SDPA
then runs another kernel: different bf16 results from eager's, and a slower call at long
sequences. A captured graph is specialised on its input shapes, so a mask computed from nothing
but those shapes is a constant: it is evaluated once here, on the CPU, and when it is causal or
lets every query see every key it is replaced by what eager passes. A mask that depends on an
input or a weight, or that is any other pattern, is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

log = logging.getLogger(__name__)

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
#: Masks (and the intermediates that build them) up to this many elements are evaluated: a
#: causal mask of 8192 tokens. Larger ones are left to the graph.
MAX_FOLDED_ELEMENTS = 2**26
#: Graph nodes that only check metadata: they have no users and may go with what they check.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}
_CPU = torch.device("cpu")


def fold_constant_masks(gm: torch.fx.GraphModule) -> int:
    """Replace every SDPA call's constant causal or all-visible mask by eager's flags; how many.

    Parameters
    ----------
    gm:
        A captured graph, changed in place (the caller recompiles it).

    Returns
    -------
    int
        The number of SDPA calls whose mask was folded.
    """
    folded = 0
    constants: dict[torch.fx.Node, Any] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        args = _sdpa_arguments(node)
        mask = args["attn_mask"]
        if not isinstance(mask, torch.fx.Node) or args["is_causal"] or args["dropout_p"]:
            continue
        value = _evaluate(mask, constants)
        if value is None:
            continue
        queries, keys = _length(args["query"]), _length(args["key"])
        pattern = _pattern(value, queries, keys)
        if pattern is None:
            continue
        rest = {k: v for k, v in args.items() if k not in ("query", "key", "value", "attn_mask")}
        node.args = (args["query"], args["key"], args["value"])
        node.kwargs = {**rest, "is_causal": pattern == "causal"}
        _erase_unused(mask)
        folded += 1
    if folded:
        log.debug("folded %d constant attention mask(s) into is_causal / no mask", folded)
    return folded


def _sdpa_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    names = [a.name for a in _SDPA._schema.arguments]
    defaults = {a.name: a.default_value for a in _SDPA._schema.arguments if a.has_default_value()}
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _length(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return int(val.shape[-2]) if isinstance(val, torch.Tensor) and val.dim() >= 2 else None


def _evaluate(node: torch.fx.Node, constants: dict[torch.fx.Node, Any]) -> torch.Tensor | None:
    """``node``'s value on the CPU when it depends on no graph input; None otherwise (or too large)."""
    order: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen or current in constants:
            continue
        seen.add(current)
        if current.op != "call_function":
            return None  # a placeholder (input or weight) or anything else: not a constant
        val = current.meta.get("val")
        if isinstance(val, torch.Tensor) and val.numel() > MAX_FOLDED_ELEMENTS:
            return None
        order.append(current)
        stack.extend(current.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    try:
        with torch.no_grad():
            for current in sorted(order, key=position.__getitem__):
                args, kwargs = torch.fx.node.map_arg((current.args, current.kwargs), constants.__getitem__)
                args, kwargs = _on_cpu((args, kwargs))
                constants[current] = current.target(*args, **kwargs)
    except Exception as exc:  # anything the CPU cannot run here stays in the graph
        log.debug("attention mask %s not folded: %s", node.name, exc)
        return None
    value = constants[node]
    return value if isinstance(value, torch.Tensor) else None


def _on_cpu(value: Any) -> Any:
    """Device arguments pointed at the CPU, where the constant is evaluated."""
    if isinstance(value, torch.device):
        return _CPU
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def _pattern(mask: torch.Tensor, queries: int | None, keys: int | None) -> str | None:
    """``"causal"``, ``"visible"`` (every key for every query) or None, for SDPA's mask semantics."""
    if queries is None or keys is None or mask.dim() < 2 or tuple(mask.shape[-2:]) != (queries, keys):
        return None
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return "visible"
        causal = torch.ones(queries, keys, dtype=torch.bool).tril()
        if queries == keys and bool((mask == causal).all()):
            return "causal"
        return None
    if mask.is_floating_point() and bool((mask == 0).all()):
        return "visible"  # an additive mask of zeros changes nothing
    return None


def _erase_unused(node: torch.fx.Node) -> None:
    """Erase ``node`` and the nodes only it used, once nothing else reads them."""
    graph = node.graph
    erased: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current.op != "call_function" or current in erased:
            continue
        for user in list(current.users):
            if user.op == "call_function" and user.target in _CHECKS and not user.users:
                graph.erase_node(user)
                erased.add(user)
        if current.users:
            continue
        inputs = current.all_input_nodes
        graph.erase_node(current)
        erased.add(current)
        stack.extend(inputs)
