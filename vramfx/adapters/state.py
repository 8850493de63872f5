"""What a compiled graph depends on in a model's adapter layers, read fresh on every call.

A captured graph is specialised on the adapters' *structure*: which layers carry which adapters,
their ranks and shapes, the active set, which are merged, whether adapters are disabled, dropout
and its mode. Their *values* (adapter matrices, LoRA scales) are read from the model every call,
so changing them (``set_adapters`` weights, a scale, a LoRA of the same shapes hot-swapped into
the slots of another) costs no capture and no plan; a structural change selects another graph.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from vramfx.adapters.fusions import Fusion, any_fused, fusions_of
from vramfx.errors import VramfxError

#: Module attributes of an adapter layer that change what its forward computes.
_FLAGS = ("fan_in_fan_out", "use_dora", "lora_bias", "use_rslora")


@dataclass(frozen=True)
class AdapterState:
    """The adapter layers of a model at one moment.

    ``structure`` keys the graph cache. ``scales`` are each LoRA layer's ``scaling`` by
    ``(layer name, adapter)``; ``tensors`` every parameter and buffer of the adapter layers (the
    wrapped layers' included) by state-dict name; ``layers`` the adapter layers by name;
    ``merged`` the adapters merged into each layer's base weight, by layer name, in merge order;
    ``fused`` the merges recorded with streamed weights, by parameter name
    (:mod:`vramfx.adapters.fusions`), which outlive the adapter layers.
    """

    structure: Hashable
    scales: dict[tuple[str, str], float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layers: dict[str, torch.nn.Module] = field(default_factory=dict)
    fused: dict[str, tuple[Fusion, ...]] = field(default_factory=dict)


def tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every PEFT adapter layer of ``model``, by module name (none when PEFT was never imported)."""
    if "peft.tuners.tuners_utils" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def is_adapter_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a PEFT adapter layer (its wrapped layer is its ``base_layer``)."""
    if "peft.tuners.tuners_utils" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def adapter_state(model: torch.nn.Module) -> AdapterState | None:
    """The adapter state of ``model``; None when it has no adapter layers.

    Raises
    ------
    VramfxError
        For a merged adapter whose fusion into a streamed weight is not supported.
    """
    layers = tuner_layers(model)
    fused = {n: fusions_of(p) for n, p in model.named_parameters()} if any_fused() else {}
    fused = {n: f for n, f in fused.items() if f}
    if not layers and not fused:
        return None
    if not layers:
        return AdapterState((("fused", tuple((n, tuple(x.adapter for x in f)) for n, f in fused.items())),),
                            fused=fused)
    from peft.tuners.lora import LoraLayer

    structure = []
    scales: dict[tuple[str, str], float] = {}
    tensors: dict[str, torch.Tensor] = {}
    merged: dict[str, tuple[str, ...]] = {}
    for name, layer in layers:
        own = _adapter_tensors(layer)
        for key, t in _layer_tensors(layer).items():
            tensors[f"{name}.{key}" if name else key] = t
        scaling = getattr(layer, "scaling", {})
        item = (
            name,
            type(layer).__qualname__,
            tuple(layer.active_adapters),
            tuple(layer.merged_adapters),
            bool(layer.disable_adapters),
            tuple((k, tuple(t.shape), t.dtype, t.device.type) for k, t in sorted(own.items())),
            tuple((k, type(d).__qualname__, getattr(d, "p", None), d.training)
                  for k, d in sorted(getattr(layer, "lora_dropout", {}).items())),
            tuple((flag, _hashable(getattr(layer, flag, None))) for flag in _FLAGS),
            tuple(sorted(getattr(layer, "lora_variant", {}))),
        )
        if isinstance(layer, LoraLayer):
            scales.update({(name, k): float(v) for k, v in scaling.items()})
        else:  # other adapter kinds: their scales are specialised into the graph, so key on them
            item += (tuple(sorted((k, float(v)) for k, v in scaling.items())),)
        structure.append(item)
        if layer.merged_adapters:
            merged[name] = tuple(layer.merged_adapters)
    structure.append(("fused", tuple((n, tuple(x.adapter for x in f)) for n, f in fused.items())))
    return AdapterState(tuple(structure), scales, tensors, merged, dict(layers), fused)


def _layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the layer, those of the layer it wraps included."""
    out: dict[str, torch.Tensor] = {}
    for getter in (layer.named_parameters, layer.named_buffers):
        for key, t in getter(remove_duplicate=False):
            out[key] = t
    return out


def _adapter_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's own parameters and buffers, not those of the layer it wraps."""
    return {k: t for k, t in _layer_tensors(layer).items() if not k.startswith("base_layer.")}


def _hashable(value: object) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def refuse_unrecorded_merge(state: AdapterState, streamed: Callable[[str], bool]) -> None:
    """An adapter merged into a streamed weight without a record of it (merged before vramfx
    knew the weight, or of a kind it cannot apply) would run unmerged: refused instead.

    ``streamed(name)`` says whether the parameter of that name is read from the weights source.
    """
    for name, adapters in state.merged.items():
        weight = f"{name}.base_layer.weight" if name else "base_layer.weight"
        if not streamed(weight):
            continue  # a weight the model holds: PEFT merged into it
        recorded = {f.adapter for f in state.fused.get(weight, ())}
        missing = [a for a in adapters if a not in recorded]
        if missing:
            raise VramfxError(
                f"adapter(s) {', '.join(missing)} are fused into {name}, whose weight is streamed from the "
                "checkpoint, but vramfx did not see the fusion (it happened before the model was built under "
                "vramfx.skip_model_initialization or compiled, or it is not plain LoRA on nn.Linear): "
                "unfuse them (unfuse_lora()) and fuse again after compile or enable_vram_management, or keep "
                "them unfused"
            )
