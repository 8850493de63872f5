"""Module maps: the wrapper class each module type gets.

Besides vramfx's own classes, a map may name classes by their dotted names, and name DiffSynth-
Studio's wrapper classes (``diffsynth.core.vram.layers.AutoWrappedLinear``, as strings or as the
classes themselves), as its ``VRAM_MANAGEMENT_MODULE_MAPS`` do: each is translated to the vramfx
wrapper of the same name and behaviour, so those maps work as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from vramfx.swap.wrappers import AutoWrappedLinear, AutoWrappedModule, AutoWrappedNonRecurseModule, SwapSwitches

#: The wrapper classes, by the name both libraries give them.
WRAPPERS: dict[str, type] = {
    cls.__name__: cls for cls in (AutoWrappedModule, AutoWrappedNonRecurseModule, AutoWrappedLinear)
}
#: Where DiffSynth-Studio defines its wrappers (a map may name them without importing them).
_FOREIGN_PACKAGE = "diffsynth."


def resolve_module_map(module_map: Mapping[Any, Any]) -> dict[type, type]:
    """``module_map`` with every key a module class and every value a vramfx wrapper class.

    Raises
    ------
    ValueError
        Naming the entry: an empty map, a key that is no ``nn.Module`` subclass (or a dotted name
        that does not import as one), or a value that is no wrapper class.

    Examples
    --------
    >>> resolve_module_map({"torch.nn.Linear": "diffsynth.core.vram.layers.AutoWrappedLinear"})
    {<class 'torch.nn.modules.linear.Linear'>: <class 'vramfx.swap.wrappers.AutoWrappedLinear'>}
    """
    if not isinstance(module_map, Mapping) or not module_map:
        raise ValueError("module_map must be a non-empty dict of module type -> wrapper class")
    resolved: dict[type, type] = {}
    for key, value in module_map.items():
        module_class = _module_class(key)
        wrapper = _wrapper_class(module_class, value)
        if issubclass(wrapper, AutoWrappedLinear) and not issubclass(module_class, torch.nn.Linear):
            raise ValueError(
                f"module_map[{module_class.__name__}] = AutoWrappedLinear, which wraps nn.Linear only; use AutoWrappedModule"
            )
        resolved[module_class] = wrapper
    return resolved


def _module_class(key: Any) -> type:
    """The module class ``key`` is or names."""
    found = _imported(key, "key") if isinstance(key, str) else key
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ValueError(f"module_map key {key!r} is not an nn.Module subclass")
    return found


def _wrapper_class(module_class: type, value: Any) -> type:
    """The vramfx wrapper ``value`` is or names (DiffSynth-Studio's wrappers by their name, never
    imported)."""
    if isinstance(value, str):
        package, _, name = value.rpartition(".")
        if (package + ".").startswith(_FOREIGN_PACKAGE):
            return _translated(module_class, name)
        value = _imported(value, f"[{module_class.__name__}] =")
    if isinstance(value, type):
        if issubclass(value, SwapSwitches):
            return value
        if value.__module__.startswith(_FOREIGN_PACKAGE):
            return _translated(module_class, value.__name__)
    raise ValueError(
        f"module_map[{module_class.__name__}] = {getattr(value, '__name__', value)!r}; use "
        f"{', '.join(WRAPPERS)} from vramfx.swap (or DiffSynth-Studio's classes of those names)"
    )


def _translated(module_class: type, name: str) -> type:
    """The vramfx wrapper for DiffSynth-Studio's wrapper class ``name``."""
    if name in WRAPPERS:
        return WRAPPERS[name]
    hint = (
        ", which wraps layers quantized by a backend: vramfx does not run those kernels (see quantize= in "
        "enable_vram_management)" if name == "AutoWrappedQuantizedModule" else ""
    )
    raise ValueError(
        f"module_map[{module_class.__name__}] = DiffSynth-Studio's {name}{hint}; the wrappers vramfx has are "
        f"{', '.join(WRAPPERS)}"
    )


def _imported(dotted: str, what: str) -> Any:
    """The object a dotted name ``package.module.Name`` names, imported."""
    module_name, _, name = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"module_map {what} {dotted!r} is not an nn.Module subclass or a dotted name such as 'torch.nn.Linear'")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"module_map {what} {dotted!r} does not import: {exc}") from None
