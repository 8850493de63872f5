"""LoRA fused into weights the layer-swap runtime serves: applied after each fetch, as a cast.

A merge into a wrapped layer is recorded against the unit's anchor for that weight
(:mod:`vramfx.adapters.fusions`); the weight where it rests (disk, host, or the device) is never
rewritten. Its binding reads it through :class:`~vramfx.adapters.fused.FusedLora`, the decoder
compiled graphs use, so the planner gives it a cast slot and counts the fusion's workspace; the
merges are read as they are at each decode, except by a copy the plan keeps on the device: that
one is fused once, when it is made resident, and dropped (so fused again) when its merges change.
Which weights carry merges (and their ranks) is the *structure* a plan is made for: when it
changes, the runtime binds and plans again.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vramfx.adapters.fused import FusedLora
from vramfx.adapters.fusions import Fusion, any_fused, fusions_of
from vramfx.storage.ref import WeightRef

#: Per weight name, the merges recorded with it, in merge order.
Fusions = dict[str, tuple[Fusion, ...]]


def fused_ref(ref: WeightRef, anchor: torch.Tensor, compute_dtype: torch.dtype) -> WeightRef:
    """``ref`` decoded with the merges recorded against ``anchor`` added (``ref`` itself when none)."""
    fusions = fusions_of(anchor)
    if not fusions:
        return ref

    def merged() -> list[tuple[torch.Tensor, torch.Tensor, float, bool, bool]]:
        return [f.terms for f in fusions_of(anchor)]

    rank = sum(f.a.shape[0] for f in fusions)
    decoder = FusedLora(tuple(ref.shape), ref.dtype, ref.nbytes, merged, rank, inner=ref.decoder,
                        kept_decoded=ref.decoder is None)
    return replace(ref, decoder=decoder, compute_dtype=compute_dtype)


def merges(slots: list[tuple[str, torch.Tensor]]) -> Fusions:
    """The merges recorded against each of these ``(weight name, anchor)`` that has any."""
    if not any_fused():
        return {}
    return {name: fusions for name, anchor in slots if (fusions := fusions_of(anchor))}


def structure(fusions: Fusions) -> dict[str, tuple[tuple[str, int], ...]]:
    """What a plan depends on: which weights carry merges, of which adapters and ranks."""
    return {name: tuple((f.adapter, f.a.shape[0]) for f in fs) for name, fs in fusions.items()}
