"""``enable_vram_management``: wrap a model's modules for layer swapping; ``offload``/``onload`` it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vramfx.swap.patch import bound_calls
from vramfx.swap.runtime import SwapStats
from vramfx.swap.units import loose_tensors, materialise, move_home
from vramfx.swap.wrappers import AutoWrappedLinear, Binding, SwapSwitches

_ATTRIBUTE = "_vramfx_swap"


def enable_vram_management(
    model: torch.nn.Module,
    module_map: Mapping[type, type],
    vram_config: Mapping[str, Any],
    vram_limit: int | float | str | None = None,
    disk_map: Any = None,
    *,
    prefetch: bool = True,
    bypass_page_cache: bool = False,
) -> torch.nn.Module:
    """Replace ``model``'s modules by wrappers that move their weights in around each call.

    Parameters
    ----------
    model:
        The model, changed in place. It may be built under
        :func:`vramfx.skip_model_initialization` when weights come from ``disk_map``.
    module_map:
        Module type → wrapper class (:class:`AutoWrappedModule`, :class:`AutoWrappedLinear`),
        matched with ``isinstance`` in order. A matched module is wrapped whole and not
        descended into. Parameters of unmatched modules, and every buffer, are put on the
        computation device once (floating parameters in the computation dtype) and stay there.
    vram_config:
        ``offload_dtype/offload_device`` (where weights rest), ``onload_dtype/onload_device``
        (where they wait after :func:`onload`), ``preparing_dtype/preparing_device`` (where the
        plan keeps weights: the computation device; they are held, kept or streamed, in the
        narrower of their resting and computation dtypes), and
        ``computation_dtype/computation_device`` (what the op runs in). An omitted dtype or
        device is the computation one; ``"disk"`` means read from ``disk_map`` on demand, with
        the parameters left meta. A floating dtype only applies to floating tensors.
    vram_limit:
        Bytes of wrapped weights vramfx may hold on the computation device at once — kept
        weights, the arena the others stream through and per-call casts, by its own count (not
        the device's free memory, which other processes change). A number is GB as the original
        counts them (2**30 bytes); a string is any :func:`vramfx.parse_budget` form (``"6GiB"``,
        ``"90%"``). ``None``: no limit, every weight is kept after the first call. A limit below
        what the modules need at once (``0`` included) loads every module synchronously, one at
        a time: the least memory possible.
    disk_map:
        A :class:`vramfx.DiskMap` (or path) holding the weights, by the model's state-dict
        names (or the checkpoint names transformers would load them from).
    prefetch:
        Fetch the next modules' weights ahead along the recorded order, on the engine compiled
        graphs use (a reader thread on CPU, a copy stream on CUDA). ``False`` fetches each when
        it is called, as the original does.
    bypass_page_cache:
        Read ``disk_map`` with ``O_DIRECT``, for models larger than RAM (and to measure cold
        reads honestly).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        A bad argument (the message names it).
    WeightsError
        Weights missing from ``disk_map`` or of another shape, all listed; nothing is changed.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> _ = enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear},
    ...                            dict(computation_device="cpu"), vram_limit=0)
    >>> model(torch.ones(1, 4)).shape
    torch.Size([1, 4])
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _ATTRIBUTE in model.__dict__:
        raise ValueError(f"{type(model).__name__} already has vram management enabled")
    _check_module_map(module_map)
    binding = Binding.create(
        model, vram_config, vram_limit, disk_map, prefetch=prefetch, bypass_page_cache=bypass_page_cache
    )
    matches = _matches(model, module_map)
    # Every weight is found and checked before the model is changed at all.
    covered = set()
    for _parent, _attr, name, child, _cls in matches:
        covered.update(id(m) for m in child.modules())
        binding.builder.slots(child, name, recursive=True, required=binding.on_disk)
    loose = loose_tensors(model, binding.builder, covered)
    binding.builder.raise_problems(type(model).__name__)

    wrapped: dict[int, torch.nn.Module] = {}
    for parent, attr, name, child, cls in matches:
        if id(child) not in wrapped:  # a module shared by two parents is wrapped once
            wrapped[id(child)] = cls(child, name=name, binding=binding)
        setattr(parent, attr, wrapped[id(child)])
    materialise(loose, binding.config.device, binding.config.computation)
    bound_calls(model, binding.runtime)
    model.__dict__[_ATTRIBUTE] = binding
    return model


def offload(model: torch.nn.Module) -> None:
    """Move every wrapped module's weights to their offload state and free what vramfx holds on the device.

    For pipelines that move whole components between uses. Calling the model afterwards works
    (weights stream from the offload state).
    """
    binding = _binding(model)
    binding.runtime.release()
    for unit in binding.runtime.units:
        move_home(unit, binding.config.offload)
    binding.runtime.homes_changed()


def onload(model: torch.nn.Module) -> None:
    """Move every wrapped module's weights to their onload state (where they wait while in use)."""
    binding = _binding(model)
    for unit in binding.runtime.units:
        move_home(unit, binding.config.onload)
    binding.runtime.homes_changed()


def swap_stats(model: torch.nn.Module) -> SwapStats:
    """What vramfx holds for ``model`` on the device, and what its latest call fetched."""
    return _binding(model).runtime.stats()


def _binding(model: torch.nn.Module) -> Binding:
    binding = model.__dict__.get(_ATTRIBUTE)
    if binding is None:
        raise ValueError(f"{type(model).__name__} has no vram management; call enable_vram_management first")
    return binding


def _check_module_map(module_map: Mapping[type, type]) -> None:
    if not isinstance(module_map, Mapping) or not module_map:
        raise ValueError("module_map must be a non-empty dict of module type -> wrapper class")
    for key, value in module_map.items():
        if not (isinstance(key, type) and issubclass(key, torch.nn.Module)):
            raise ValueError(f"module_map key {key!r} is not an nn.Module subclass")
        if not (isinstance(value, type) and issubclass(value, SwapSwitches)):
            raise ValueError(
                f"module_map[{key.__name__}] = {value!r}; use AutoWrappedModule or AutoWrappedLinear from vramfx.swap"
            )
        if issubclass(value, AutoWrappedLinear) and not issubclass(key, torch.nn.Linear):
            raise ValueError(f"module_map[{key.__name__}] = AutoWrappedLinear, which wraps nn.Linear only; use AutoWrappedModule")


def _matches(
    model: torch.nn.Module, module_map: Mapping[type, type]
) -> list[tuple[torch.nn.Module, str, str, torch.nn.Module, type]]:
    """``(parent, attribute, qualified name, module, wrapper class)`` for each matched module."""
    found = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for attr, child in module.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, SwapSwitches):
                continue
            cls = next((w for t, w in module_map.items() if isinstance(child, t)), None)
            if cls is not None:
                found.append((module, attr, name, child, cls))
            else:
                walk(child, name)

    walk(model, "")
    return found
