"""Adapter weights added to a layer whose weight vramfx streams stay in host memory.

PEFT puts a new adapter's weights on the device of the layer it wraps. For a layer whose weight is
meta (built under :func:`vramfx.skip_model_initialization`, or compiled from such a model), that
moves the adapter's loaded values to ``meta``, where they are lost. For the meta weights vramfx
knows it streams, the adapter is kept on the host instead, in the layer's dtype, and planned like
any other weight. Other meta models keep PEFT's behaviour. A LoRA merged into such a weight is
recorded with it (:mod:`vramfx.adapters.fusions`).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from vramfx.adapters.fusions import recording

_HOST = torch.device("cpu")
#: Streamed meta parameters by ``id`` (tensors compare by value, so no WeakSet), held weakly.
_streamed: dict[int, weakref.ref] = {}
_lock = threading.Lock()
_installed = [False]


def mark_streamed(parameters: Iterable[torch.Tensor]) -> None:
    """Remember these meta parameters as streamed by vramfx: adapters wrapping them stay on the host."""
    with _lock:
        for p in parameters:
            if p.is_meta:
                _streamed[id(p)] = weakref.ref(p, functools.partial(_forget, id(p)))


def _forget(key: int, ref: weakref.ref) -> None:
    if _streamed.get(key) is ref:
        del _streamed[key]


def is_streamed(tensor: object) -> bool:
    """Whether ``tensor`` is a meta parameter vramfx streams (:func:`mark_streamed`)."""
    ref = _streamed.get(id(tensor))
    return ref is not None and ref() is tensor


def adapter_home(layer: Any) -> tuple[torch.device, torch.dtype | None] | None:
    """Where adapters wrapping ``layer`` keep their weights, and in which dtype; None where PEFT's
    rule (the layer's weight's device and dtype) holds.

    A layer of the layer-swap path names its own (its computation device and dtype: adapters
    are used there, as its hot-loaded LoRA lists are); a layer whose weight vramfx streams into
    compiled graphs has them in host memory, in its dtype.
    """
    home = getattr(layer, "vramfx_adapter_home", None)
    if home is not None:
        return home
    weight = getattr(layer, "weight", None)
    return (_HOST, weight.dtype) if is_streamed(weight) else None


def install() -> None:
    """Teach PEFT (once) where adapters of streamed layers go.

    PEFT is imported here only when it is installed and a library that adds adapters with it
    (transformers, diffusers) is already imported, which makes the import cheap.
    """
    if _installed[0]:
        return
    if "peft.tuners.tuners_utils" not in sys.modules:
        if not any(m in sys.modules for m in ("transformers", "diffusers")) or not _peft_installed():
            return
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    with _lock:
        if _installed[0]:
            return
        # PEFT moves a new adapter to its base layer's device in two places: when the adapter
        # layer is made (update_layer) and when it replaces the wrapped layer in the model.
        device_of = BaseTunerLayer._get_base_layer_device_and_dtype

        @functools.wraps(device_of)
        def device_and_dtype(self: Any, base_layer: Any) -> tuple:
            device, dtype = device_of(self, base_layer)
            home = adapter_home(base_layer)
            return (device, dtype) if home is None else home

        BaseTunerLayer._get_base_layer_device_and_dtype = device_and_dtype
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.model import LoraModel

        LoraLinear.merge, LoraLinear.unmerge = recording(LoraLinear.merge, LoraLinear.unmerge, is_streamed)

        for tuner in (BaseTuner, LoraModel):
            if "_replace_module" in vars(tuner):
                tuner._replace_module = _keeping_host(vars(tuner)["_replace_module"])
        _installed[0] = True


@functools.cache
def _peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def _keeping_host(replace_module: Any) -> Any:
    """``replace_module`` (PEFT's), except that a new adapter layer wrapping a streamed layer keeps
    its adapter weights where they are instead of following the wrapped layer to ``meta``."""

    @functools.wraps(replace_module)
    def replace(self: Any, parent: Any, child_name: str, new_module: Any, child: Any) -> Any:
        home = adapter_home(child)
        if home is None:
            return replace_module(self, parent, child_name, new_module, child)
        held = {n: p.data for n, p in new_module.named_parameters() if not p.is_meta and ".base_layer" not in f".{n}"}
        result = replace_module(self, parent, child_name, new_module, child)
        for name, data in held.items():
            owner, _, leaf = name.rpartition(".")
            module = new_module.get_submodule(owner)
            moved = module._parameters[leaf]
            if moved.device != data.device:  # PEFT moved it to the wrapped layer's device: put it back
                module._parameters[leaf] = torch.nn.Parameter(data, requires_grad=moved.requires_grad)
        return result

    return replace
