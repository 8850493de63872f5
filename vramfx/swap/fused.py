"""LoRA fused into weights the layer-swap runtime serves: applied after each fetch, as a cast.

A merge into a wrapped layer is recorded against the unit's anchor for that weight
(:mod:`vramfx.adapters.fusions`); the weight where it rests (disk, host, or the device) is never
rewritten. Its binding reads it through :class:`~vramfx.adapters.fused.FusedLora`, the decoder
compiled graphs use, so the planner gives it a cast slot and counts the fusion's workspace; the
merges are read as they are at each decode. Which weights carry merges (and their ranks) is the
*structure* a plan is made for: when it changes, the runtime binds and plans again.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vramfx.adapters.fused import FusedLora
from vramfx.adapters.fusions import any_fused, fusions_of
from vramfx.storage.ref import WeightRef

#: Per weight name, the adapters merged into it with their ranks, in merge order.
FusionStructure = dict[str, tuple[tuple[str, int], ...]]


def fused_ref(ref: WeightRef, anchor: torch.Tensor, compute_dtype: torch.dtype) -> WeightRef:
    """``ref`` decoded with the merges recorded against ``anchor`` added (``ref`` itself when none)."""
    fusions = fusions_of(anchor)
    if not fusions:
        return ref

    def merged() -> list[tuple[torch.Tensor, torch.Tensor, float, bool, bool]]:
        return [f.terms for f in fusions_of(anchor)]

    rank = sum(f.a.shape[0] for f in fusions)
    decoder = FusedLora(tuple(ref.shape), ref.dtype, ref.nbytes, merged, rank, inner=ref.decoder)
    return replace(ref, decoder=decoder, compute_dtype=compute_dtype)


def fusion_structure(slots: list[tuple[str, torch.Tensor]]) -> FusionStructure:
    """Which of these ``(weight name, anchor)`` carry merges, and of what ranks."""
    if not any_fused():
        return {}
    out = {}
    for name, anchor in slots:
        fusions = fusions_of(anchor)
        if fusions:
            out[name] = tuple((f.adapter, f.a.shape[0]) for f in fusions)
    return out
