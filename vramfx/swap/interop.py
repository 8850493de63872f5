"""Wrappers that DiffSynth-Studio's pipelines recognise as their own.

Its pipelines find hot-loadable linears with ``isinstance(module, LoRAHotLoadMixin)`` (``load_lora``,
``clear_lora``). When DiffSynth-Studio is imported, a vramfx ``AutoWrappedLinear`` also derives from
that mixin (through a subclass made once), so those pipelines load adapters into it instead of
skipping it: with nothing found they would load nothing, and give the model's output without
the adapter, silently. vramfx never imports DiffSynth-Studio itself.
"""

from __future__ import annotations

import functools
import sys

import torch

_LAYERS = "diffsynth.core.vram.layers"


def join_lora_hot_load(layer: torch.nn.Module) -> None:
    """Make ``layer`` an instance of DiffSynth-Studio's ``LoRAHotLoadMixin`` when that is imported."""
    mixin = getattr(sys.modules.get(_LAYERS), "LoRAHotLoadMixin", None)
    if isinstance(mixin, type) and not isinstance(layer, mixin):
        layer.__class__ = _joined(type(layer), mixin)


@functools.cache
def _joined(cls: type, mixin: type) -> type:
    """``cls`` deriving from ``mixin`` too, ``cls``'s own methods first."""
    return type(cls.__name__, (cls, mixin), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
