"""LoRA scales as values the captured graph reads each call, not constants baked into it.

PEFT multiplies each LoRA branch by ``layer.scaling[adapter]``, a Python float, which export would
specialise into the graph: every ``set_adapters`` weight or scale change would need a new capture.
While the model is exported, each scale is served as a buffer instead (so the graph reads it like
a weight); after export those reads become graph attributes holding one 0-d float64 CPU tensor
per scale (:class:`ScaleSlot`), which is filled with the layer's current scale before every call.
A CPU scalar keeps eager's arithmetic on every device: kernels read it as they read a Python
float, in the op's compute precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vramfx.adapters.state import tuner_layers

_BUFFER = "vramfx_lora_scale_{}"
_ATTRIBUTE = "vramfx_lora_scale_{}"


@dataclass(frozen=True)
class ScaleSlot:
    """The scale of ``adapter`` on layer ``layer``, which the graph reads from ``value``."""

    layer: str
    adapter: str
    value: torch.Tensor


class _ScaleView(dict):
    """``layer.scaling`` while export traces: each scale read as the layer's buffer for it."""

    def __init__(self, layer: torch.nn.Module, buffers: dict[str, str], scales: dict) -> None:
        super().__init__(scales)
        self._layer = layer
        self._buffers = buffers

    def __getitem__(self, adapter: str) -> object:
        if adapter in self._buffers:
            return getattr(self._layer, self._buffers[adapter])
        return super().__getitem__(adapter)


@contextlib.contextmanager
def scales_as_buffers(model: torch.nn.Module) -> Iterator[dict[str, tuple[str, str]]]:
    """While the block runs, every LoRA scale of ``model`` is a non-persistent buffer.

    Yields the buffers' state-dict names → ``(layer name, adapter)``. The model is restored on exit.
    """
    from_buffer: dict[str, tuple[str, str]] = {}
    undo: list[tuple[torch.nn.Module, dict, list[str]]] = []
    try:
        for name, layer in _lora_layers(model):
            scaling = layer.scaling
            buffers = {}
            for i, adapter in enumerate(scaling):
                buffer = _BUFFER.format(i)
                layer.register_buffer(buffer, torch.tensor(float(scaling[adapter]), dtype=torch.float64),
                                      persistent=False)
                buffers[adapter] = buffer
                from_buffer[f"{name}.{buffer}" if name else buffer] = (name, adapter)
            undo.append((layer, scaling, list(buffers.values())))
            layer.scaling = _ScaleView(layer, buffers, scaling)
        yield from_buffer
    finally:
        for layer, scaling, buffers in undo:
            layer.scaling = scaling
            for buffer in buffers:
                del layer._buffers[buffer]


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from_peft = tuner_layers(model)
    if not from_peft:
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in from_peft if isinstance(m, LoraLayer) and isinstance(m.scaling, dict)]


def lift_scales(
    gm: torch.fx.GraphModule, weights: Sequence, from_buffer: dict[str, tuple[str, str]]
) -> tuple[tuple, tuple[ScaleSlot, ...]]:
    """Turn the scale buffers among ``weights`` (capture's weight specs) into graph attributes.

    Returns the remaining weights and one :class:`ScaleSlot` per scale, whose ``value`` the graph
    reads. A scale the graph does not read (an inactive or merged adapter) gets no slot.
    """
    kept, slots = [], []
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for spec in weights:
        where = from_buffer.get(spec.name)
        if where is None:
            kept.append(spec)
            continue
        used = [placeholders[p] for p in spec.placeholders if placeholders[p].users]
        if used:
            attribute = _ATTRIBUTE.format(len(slots))
            value = spec.value.clone()
            gm.register_buffer(attribute, value, persistent=False)
            with gm.graph.inserting_before(first):
                read = gm.graph.get_attr(attribute)
            read.meta["val"] = used[0].meta.get("val")
            for node in used:
                node.replace_all_uses_with(read)
            slots.append(ScaleSlot(where[0], where[1], value))
        for p in spec.placeholders:
            gm.graph.erase_node(placeholders[p])
    return tuple(kept), tuple(slots)
