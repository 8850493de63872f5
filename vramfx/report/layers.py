"""Layers: which part of the model each graph position computes, for grouping a schedule.

A schedule of a 40-block transformer has thousands of positions and hundreds of steps; people
read it by block. A position's layer is the module that runs it (``node.meta["nn_module_stack"]``
from capture), cut to the repeated block it belongs to (``blocks.12``, ``model.layers.3``) or,
outside the numbered blocks, to the module one level below their container (``patch_embedding``,
``model.embed_tokens``). Positions of the root module, or of a module wrapping the blocks
(``model`` in a causal LM), run between layers and join the layer before them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness

if TYPE_CHECKING:  # capture and liveness load torch.export machinery and networkx: only for plan
    from vramfx.capture import Captured

#: The label of positions that belong to no module at all (a model that is one module).
TOP_LEVEL = "(model)"


def module_paths(captured: Captured, liveness: Liveness) -> tuple[str, ...]:
    """The innermost module path that runs each position; ``""`` for the root module.

    Where capture recorded no module stack, a position that reads weights takes the module of
    the first weight it reads.
    """
    from vramfx.plan.liveness import compute_nodes

    paths = []
    for node in compute_nodes(captured.graph_module.graph):
        stack = node.meta.get("nn_module_stack") or {}
        paths.append(str(list(stack.values())[-1][0]) if stack else "")
    if any(paths):
        return tuple(paths)
    for weight in reversed(liveness.weights):  # reversed: the first weight read wins
        for position in weight.uses:
            paths[position] = weight.name.rpartition(".")[0]
    return tuple(paths)


def layer_labels(paths: Sequence[str]) -> tuple[str, ...]:
    """Each position's layer, given the module path that runs it.

    Examples
    --------
    >>> layer_labels(["", "model.embed_tokens", "model", "model.layers.0.mlp", "",
    ...               "model.layers.1", "model.norm", "lm_head"])  # doctest: +NORMALIZE_WHITESPACE
    ('model.embed_tokens', 'model.embed_tokens', 'model.embed_tokens', 'model.layers.0',
     'model.layers.0', 'model.layers.1', 'model.norm', 'lm_head')
    """
    containers = _block_containers(paths)
    labels: list[str] = [_layer(p, containers) for p in paths]
    # Root-module positions join the layer before them (the first ones, the layer after).
    known = next((label for label in labels if label), TOP_LEVEL)
    for i, label in enumerate(labels):
        if label:
            known = label
        else:
            labels[i] = known
    return tuple(labels)


def weight_layers(names: Sequence[str]) -> dict[str, str]:
    """The layer each weight belongs to: its module path cut as :func:`layer_labels` cuts one.

    Examples
    --------
    >>> weight_layers(["blocks.0.attn.to_q.weight", "proj_out.weight", "scale_shift_table"])
    {'blocks.0.attn.to_q.weight': 'blocks.0', 'proj_out.weight': 'proj_out', 'scale_shift_table': 'scale_shift_table'}
    """
    containers = _block_containers(names)
    return {name: _layer(name.rpartition(".")[0], containers) or name for name in names}


def _block_containers(paths: Iterable[str]) -> frozenset[str]:
    """Every prefix followed by a numeric component in some path."""
    out = set()
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                out.add(".".join(parts[:i]))
                break
    return frozenset(out)


def _layer(path: str, containers: frozenset[str]) -> str:
    """``path`` cut after its first numeric component, else one level below a container's parent."""
    if not path:
        return ""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    # Outside the numbered blocks: keep as many components as the deepest container parent
    # this path shares, plus one (``model.embed_tokens`` beside ``model.layers``). A module
    # that wraps the blocks (``model`` around ``model.layers``) runs between layers, as the
    # root does.
    depth = 0
    for container in containers:
        parent = container.split(".")[:-1]
        if parent[: len(parts)] == parts and len(parts) <= len(parent):
            return ""
        if parts[: len(parent)] == parent:
            depth = max(depth, len(parent))
    return ".".join(parts[: depth + 1])


@dataclass(frozen=True)
class Block:
    """A run of consecutive positions computing one layer, and the steps that run during it.

    Positions are ``[begin, end)``: begin inclusive, end exclusive. Steps at ``num_positions``
    (drops after the last node) belong to the last block. ``fetch``, ``wait`` and ``drop`` are
    indices into ``plan.transfers``.
    """

    layer: str
    begin: int
    end: int
    fetch: tuple[int, ...]
    wait: tuple[int, ...]
    drop: tuple[int, ...]


def schedule_blocks(plan: Plan, labels: Sequence[str]) -> tuple[Block, ...]:
    """Split ``plan``'s positions into blocks of one layer each, with their fetches, waits, drops.

    Parameters
    ----------
    plan:
        The plan.
    labels:
        The layer of each position (:func:`layer_labels`).

    Returns
    -------
    tuple of Block
        In position order, covering every position once.
    """
    if len(labels) != plan.num_positions:
        raise ValueError(f"labels has {len(labels)} entries, expected {plan.num_positions}")
    bounds: list[tuple[str, int, int]] = []
    for position, label in enumerate(labels):
        if bounds and bounds[-1][0] == label:
            bounds[-1] = (label, bounds[-1][1], position + 1)
        else:
            bounds.append((label, position, position + 1))
    if not bounds:
        bounds.append((TOP_LEVEL, 0, 0))
    block_of = [0] * (plan.num_positions + 1)
    for k, (_, begin, end) in enumerate(bounds):
        block_of[begin:end] = [k] * (end - begin)
    block_of[plan.num_positions] = len(bounds) - 1
    steps: dict[str, list[list[int]]] = {op: [[] for _ in bounds] for op in ("fetch", "wait", "drop")}
    for i, transfer in enumerate(plan.transfers):
        steps["fetch"][block_of[transfer.fetch]].append(i)
        steps["wait"][block_of[transfer.wait]].append(i)
        steps["drop"][block_of[transfer.drop]].append(i)
    return tuple(
        Block(
            layer=label,
            begin=begin,
            end=end,
            fetch=tuple(steps["fetch"][k]),
            wait=tuple(steps["wait"][k]),
            drop=tuple(steps["drop"][k]),
        )
        for k, (label, begin, end) in enumerate(bounds)
    )
