"""Wrappers that DiffSynth-Studio's pipelines recognise as their own.

Its pipelines find hot-loadable linears with ``isinstance(module, LoRAHotLoadMixin)`` (``load_lora``,
``clear_lora``). Were vramfx's ``AutoWrappedLinear`` not one, they would find nothing, load nothing
and give the model's output without the adapter, silently. So once DiffSynth-Studio is imported, the
first wrapped linear made adds that mixin to ``AutoWrappedLinear``'s bases (after its own, whose
methods come first). vramfx never imports DiffSynth-Studio itself.
"""

from __future__ import annotations

import sys

_LAYERS = "diffsynth.core.vram.layers"


def join_lora_hot_load(cls: type) -> None:
    """Make ``cls`` derive from DiffSynth-Studio's ``LoRAHotLoadMixin`` too, when that is imported."""
    mixin = getattr(sys.modules.get(_LAYERS), "LoRAHotLoadMixin", None)
    if isinstance(mixin, type) and not issubclass(cls, mixin):
        cls.__bases__ = (*cls.__bases__, mixin)
