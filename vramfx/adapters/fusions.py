"""Adapters fused into a streamed weight, remembered by the weight, as PEFT's merge left them.

PEFT's ``merge`` (``fuse_lora``, ``merge_and_unload``) adds ``scale * (B @ A)`` to the base
weight in place. A weight vramfx streams is meta in the model, so that addition is lost, and the
layer may be unloaded afterwards (``fuse_lora()`` then ``unload_lora_weights()`` keeps a fused
model without its adapters). So for a streamed weight the merge is recorded here instead: the
adapter's matrices and scale at the moment it was merged, kept with the weight until ``unmerge``
takes them off again. A compiled graph adds the recorded deltas after each fetch
(:class:`~vramfx.adapters.fused.FusedLora`). Only plain LoRA on ``nn.Linear`` can be recorded; a
merge vramfx could not apply (DoRA, ``lora_bias``) is refused before anything changes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vramfx.errors import VramfxError


SWAPPED_FUSION = (
    "adapters cannot be fused into layers the layer-swap path moves in per call (their weights, on disk or "
    "kept on the device, would not see it): keep them unfused there, or use vramfx.compile, which adds "
    "fused adapters after each fetch"
)


@dataclass(frozen=True)
class Fusion:
    """One adapter merged into a weight: ``weight += scale * (B @ A)`` (transposed with ``fan_in_fan_out``)."""

    adapter: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False


_fused: dict[int, tuple[weakref.ref, list[Fusion]]] = {}
_lock = threading.Lock()


def fusions_of(weight: torch.Tensor) -> tuple[Fusion, ...]:
    """The adapters merged into ``weight``, in merge order."""
    entry = _fused.get(id(weight))
    return tuple(entry[1]) if entry is not None and entry[0]() is weight else ()


def any_fused() -> bool:
    return bool(_fused)


def refuse_fused(model: torch.nn.Module) -> None:
    """Refuse a model holding weights with recorded fusions, for the layer-swap path."""
    if any_fused() and any(fusions_of(p) for p in model.parameters()):
        raise VramfxError(SWAPPED_FUSION)


def _record(weight: torch.Tensor, fusion: Fusion) -> None:
    with _lock:
        entry = _fused.get(id(weight))
        if entry is None or entry[0]() is not weight:
            key = id(weight)
            entry = _fused[key] = (weakref.ref(weight, functools.partial(_forget, key)), [])
        entry[1].append(fusion)


def _keep_only(weight: torch.Tensor, adapters: list[str]) -> None:
    with _lock:
        entry = _fused.get(id(weight))
        if entry is None or entry[0]() is not weight:
            return
        entry[1][:] = [f for f in entry[1] if f.adapter in adapters]
        if not entry[1]:
            del _fused[id(weight)]


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _fused.get(key)
    if entry is not None and entry[0] is ref:
        del _fused[key]


def recording(merge: Any, unmerge: Any, is_streamed: Any) -> tuple[Any, Any]:
    """PEFT LoRA ``Linear.merge`` and ``unmerge`` that record merges into streamed weights."""

    @functools.wraps(merge)
    def recorded_merge(self: Any, *args: Any, **kwargs: Any) -> Any:
        base = self.get_base_layer()
        if getattr(base, "vramfx_adapter_home", None) is not None:
            raise VramfxError(SWAPPED_FUSION)
        weight = getattr(base, "weight", None)
        if not is_streamed(weight):
            return merge(self, *args, **kwargs)
        before = len(self.merged_adapters)
        _refuse_unrecordable(self, kwargs.get("adapter_names", args[1] if len(args) > 1 else None))
        result = merge(self, *args, **kwargs)
        for adapter in self.merged_adapters[before:]:
            _record(weight, Fusion(
                adapter, self.lora_A[adapter].weight.detach().clone(), self.lora_B[adapter].weight.detach().clone(),
                float(self.scaling[adapter]), bool(getattr(self, "fan_in_fan_out", False)),
            ))
        return result

    @functools.wraps(unmerge)
    def recorded_unmerge(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = unmerge(self, *args, **kwargs)
        weight = getattr(self.get_base_layer(), "weight", None)
        if is_streamed(weight):
            _keep_only(weight, list(self.merged_adapters))
        return result

    return recorded_merge, recorded_unmerge


def _refuse_unrecordable(layer: Any, adapter_names: Any) -> None:
    names = adapter_names if adapter_names is not None else list(layer.active_adapters)
    for adapter in names:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue
        if adapter in getattr(layer, "lora_variant", {}) or bool(getattr(layer, "lora_bias", {}).get(adapter)):
            raise VramfxError(
                f"adapter {adapter!r} cannot be fused into a weight vramfx streams (DoRA and lora_bias "
                "adapters change more than the weight): keep it unfused"
            )
