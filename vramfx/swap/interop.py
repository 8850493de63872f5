"""Wrappers that DiffSynth-Studio's pipelines recognise as their own, and its LoRA loader honoured.

Its pipelines find hot-loadable linears with ``isinstance(module, LoRAHotLoadMixin)`` (``load_lora``,
``clear_lora``). Were vramfx's ``AutoWrappedLinear`` not one, they would find nothing, load nothing
and give the model's output without the adapter, silently. So once DiffSynth-Studio is imported, the
first wrapped linear made adds that mixin to ``AutoWrappedLinear``'s bases (after its own, whose
methods come first). Its fusing loader (``load_lora(..., hotload=False)``) would miss the layers of a
wrapped model the same way: on such a model it fuses through :mod:`vramfx.swap.lora_loader`
instead. vramfx never imports DiffSynth-Studio itself.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

_LAYERS = "diffsynth.core.vram.layers"
_LORA = "diffsynth.utils.lora.general"


def join_lora_hot_load(cls: type) -> None:
    """Make ``cls`` derive from DiffSynth-Studio's ``LoRAHotLoadMixin`` too, when that is imported."""
    mixin = getattr(sys.modules.get(_LAYERS), "LoRAHotLoadMixin", None)
    if isinstance(mixin, type) and not issubclass(cls, mixin):
        cls.__bases__ = (*cls.__bases__, mixin)


def join_lora_fusion() -> None:
    """Make DiffSynth-Studio's fusing LoRA loader fuse into wrapped models (when it is imported)."""
    loader = getattr(sys.modules.get(_LORA), "GeneralLoRALoader", None)
    fuse = getattr(loader, "fuse_lora_to_base_model", None)
    if fuse is None or getattr(fuse, "vramfx_joined", False):
        return

    @functools.wraps(fuse)
    def fuse_lora_to_base_model(self: Any, model: Any, state_dict: Any, alpha: float = 1.0) -> Any:
        from vramfx.swap.lora_loader import fuse_into_wrapped, is_wrapped

        if not is_wrapped(model):
            return fuse(self, model, state_dict, alpha)
        fuse_into_wrapped(self, model, state_dict, alpha)
        return None

    fuse_lora_to_base_model.vramfx_joined = True  # type: ignore[attr-defined]
    loader.fuse_lora_to_base_model = fuse_lora_to_base_model  # type: ignore[union-attr]
