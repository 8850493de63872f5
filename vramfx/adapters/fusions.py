"""Adapters fused into a streamed weight, remembered by the weight, as PEFT's merge left them.

PEFT's ``merge`` (``fuse_lora``, ``merge_and_unload``) adds ``scale * (B @ A)`` to the base
weight in place. A weight vramfx streams is meta in the model, so that addition is lost, and the
layer may be unloaded afterwards (``fuse_lora()`` then ``unload_lora_weights()`` keeps a fused
model without its adapters). So for a streamed weight the merge is recorded here instead: the
adapter's matrices and scale at the moment it was merged, kept with the weight until ``unmerge``
takes them off again. A compiled graph adds the recorded deltas after each fetch
(:class:`~vramfx.adapters.fused.FusedLora`). Only plain LoRA on ``nn.Linear`` can be recorded; a
merge vramfx could not apply (DoRA, ``lora_bias``) is refused before anything changes.

A layer of the layer-swap path holds stand-ins between calls (meta tensors, or its weight where
it rests, which the runtime may also hold a kept copy of): a merge into it is recorded against
the layer's *fusion anchor* (``vramfx_fusion_anchor``, a meta tensor that stands for the weight
for the model's life) and the stand-in is left untouched, so the runtime adds the deltas after
each fetch there too and an unmerge restores the weight exactly.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch

from vramfx.errors import VramfxError


@dataclass(frozen=True)
class Fusion:
    """One adapter merged into a weight: ``weight += scale * (B @ A)`` (transposed with ``fan_in_fan_out``;
    ``widen``: half-precision factors on a CPU multiplied in float32, as PEFT does)."""

    adapter: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False
    widen: bool = True

    @property
    def terms(self) -> tuple[torch.Tensor, torch.Tensor, float, bool, bool]:
        """What :class:`~vramfx.adapters.fused.FusedLora` reads of it."""
        return self.a, self.b, self.scale, self.fan_in_fan_out, self.widen


_fused: dict[int, tuple[weakref.ref, list[Fusion]]] = {}
_lock = threading.Lock()
#: Changes to any record so far: a runtime that saw this count has seen every record as it is.
_version = [0]


def fusions_of(weight: torch.Tensor) -> tuple[Fusion, ...]:
    """The adapters merged into ``weight``, in merge order."""
    entry = _fused.get(id(weight))
    return tuple(entry[1]) if entry is not None and entry[0]() is weight else ()


def any_fused() -> bool:
    return bool(_fused)


def fusions_version() -> int:
    """A count that changes whenever a fusion is recorded or taken off (cheap to poll per call)."""
    return _version[0]


def record_fusion(weight: torch.Tensor, fusion: Fusion) -> None:
    """Remember ``fusion`` as merged into ``weight`` (a streamed parameter, or a fusion anchor)."""
    with _lock:
        entry = _fused.get(id(weight))
        if entry is None or entry[0]() is not weight:
            key = id(weight)
            entry = _fused[key] = (weakref.ref(weight, functools.partial(_forget, key)), [])
        entry[1].append(fusion)
        _version[0] += 1


def _keep_only(weight: torch.Tensor, adapters: list[str]) -> None:
    with _lock:
        entry = _fused.get(id(weight))
        if entry is None or entry[0]() is not weight:
            return
        entry[1][:] = [f for f in entry[1] if f.adapter in adapters]
        if not entry[1]:
            del _fused[id(weight)]
        _version[0] += 1


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _fused.get(key)
    if entry is not None and entry[0] is ref:
        del _fused[key]
        _version[0] += 1


def recording(merge: Any, unmerge: Any, is_streamed: Any) -> tuple[Any, Any]:
    """PEFT LoRA ``Linear.merge`` and ``unmerge`` that record merges into streamed weights."""

    def key_of(layer: Any) -> torch.Tensor | None:
        """What a merge into ``layer``'s base weight is recorded against; None: PEFT merges into it."""
        base = layer.get_base_layer()
        anchor = getattr(base, "vramfx_fusion_anchor", None)
        if anchor is not None:
            return anchor
        weight = getattr(base, "weight", None)
        return weight if is_streamed(weight) else None

    @functools.wraps(merge)
    def recorded_merge(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = key_of(self)
        if key is None:
            return merge(self, *args, **kwargs)
        before = len(self.merged_adapters)
        _refuse_unrecordable(self, kwargs.get("adapter_names", args[1] if len(args) > 1 else None))
        with _meta_weight(self.get_base_layer()):
            result = merge(self, *args, **kwargs)
        for adapter in self.merged_adapters[before:]:
            record_fusion(key, Fusion(
                adapter, self.lora_A[adapter].weight.detach().clone(), self.lora_B[adapter].weight.detach().clone(),
                float(self.scaling[adapter]), bool(getattr(self, "fan_in_fan_out", False)),
            ))
        return result

    @functools.wraps(unmerge)
    def recorded_unmerge(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = key_of(self)
        if key is None:
            return unmerge(self, *args, **kwargs)
        with _meta_weight(self.get_base_layer()):
            result = unmerge(self, *args, **kwargs)
        _keep_only(key, list(self.merged_adapters))
        return result

    return recorded_merge, recorded_unmerge


@contextlib.contextmanager
def _meta_weight(base: torch.nn.Module) -> Iterator[None]:
    """While the block runs, ``base.weight`` is a meta stand-in: PEFT's in-place addition lands
    there, not in a weight the layer-swap path serves (the recorded fusion is applied instead)."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.is_meta:
        yield
        return
    holder = next(m for m in base.modules() if m._parameters.get("weight") is weight)
    holder._parameters["weight"] = torch.nn.Parameter(
        torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=weight.requires_grad
    )
    try:
        yield
    finally:
        holder._parameters["weight"] = weight


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
