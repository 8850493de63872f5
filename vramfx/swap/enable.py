"""``enable_vram_management``: wrap a model's modules for layer swapping; ``offload``/``onload`` it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from vramfx.adapters.state import adapter_state, is_adapter_layer, refuse_unrecorded_merge
from vramfx.swap.config import DISK
from vramfx.swap.maps import resolve_module_map
from vramfx.swap.patch import bound_calls
from vramfx.swap.runtime import SwapStats
from vramfx.swap.units import loose_tensors, materialise
from vramfx.swap.wrappers import AutoWrappedLinear, AutoWrappedNonRecurseModule, Binding, SwapSwitches

log = logging.getLogger(__name__)

_ATTRIBUTE = "_vramfx_swap"
#: Storage dtypes ``quantize=`` may name: weights rest in them, cast up per call.
_QUANTIZE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16)


def enable_vram_management(
    model: torch.nn.Module,
    module_map: Mapping[Any, Any],
    vram_config: Mapping[str, Any],
    vram_limit: int | float | str | None = None,
    disk_map: Any = None,
    quantize: Any = None,
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
        Module type → wrapper class (:class:`AutoWrappedModule`, :class:`AutoWrappedLinear`,
        :class:`AutoWrappedNonRecurseModule`), matched with ``isinstance`` in order. Types and
        wrappers may be given by dotted name, and DiffSynth-Studio's wrapper classes (or names) are
        read as the vramfx ones, so its ``VRAM_MANAGEMENT_MODULE_MAPS`` work as they are. A matched
        module is wrapped whole and not descended into, except under
        :class:`AutoWrappedNonRecurseModule` (its own parameters are one unit, its submodules are
        matched in turn). If ``model`` itself matches, it is wrapped whole and the wrapper is
        returned, with its onload and preparing states those of computation (so after
        :func:`onload`, code that calls its submodules directly finds them on the device).
        Parameters of unmatched modules, and every buffer, are put on the computation device once
        (floating parameters in the computation dtype) and stay there.
    vram_config:
        ``offload_dtype/offload_device`` (where weights rest), ``onload_dtype/onload_device``
        (where they wait after :func:`onload`), ``preparing_dtype/preparing_device`` (where
        ``preparing()`` puts them: the computation device), and
        ``computation_dtype/computation_device`` (what the op runs in). An omitted dtype or
        device is the computation one; ``"disk"`` means read from ``disk_map`` on demand, with
        the parameters left meta. A floating dtype only applies to floating tensors. Weights the
        planner keeps on the device are held, kept or streamed, in the narrower of their resting
        and computation dtypes.
    vram_limit:
        Bytes of wrapped weights vramfx may hold on the computation device at once — kept
        weights, the arena the others stream through and per-call casts — by its own count. It is
        not, as in DiffSynth-Studio, a ceiling on the device memory in use (which other models,
        activations and other processes change): activations, buffers, unwrapped parameters and
        weights the model holds on the device itself (after ``onload()`` or ``preparing()`` there)
        are outside it. A number is GB as the original counts them (2**30 bytes); a string is any
        :func:`vramfx.parse_budget` form (``"6GiB"``, ``"90%"``). ``None``: no limit, every weight
        is kept after the first call. A limit below what the modules need at once (``0``
        included) loads every module synchronously, one at a time: the least memory possible.
    disk_map:
        A :class:`vramfx.DiskMap` (or path, or DiffSynth-Studio's ``DiskMap``) holding the weights,
        by the model's state-dict names (or the checkpoint names transformers would load them
        from).
    quantize:
        A storage dtype (``torch.float8_e4m3fn``, ``float8_e5m2``, ``bfloat16``, ``float16``): the
        wrapped weights rest in it (cast once as they arrive, or rounded on every read from disk)
        and are cast up to the computation dtype per call: it is the ``offload_dtype`` and
        ``onload_dtype`` (which may be omitted or the computation dtype). A DiffSynth-Studio ``QuantizeConfig`` is accepted only
        when the model holds none of the layers it quantized (``mode="dequant_once"`` left plain
        linears); backend-quantized layers (scaled int8/fp8/nf4 kernels) are refused.
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
        ``model`` itself, or its wrapper when it matched the map; either has
        ``vram_management_enabled = True``.

    Raises
    ------
    ValueError
        A bad argument (the message names it).
    WeightsError
        Weights missing from ``disk_map`` or of another shape, all listed; nothing is changed.

    Notes
    -----
    The model's calls are found however it is driven: each call of its ``forward``, or, when a
    pipeline calls its modules directly (``model_fn(dit=model, ...)``), passes found from the
    module calls themselves (see :mod:`vramfx.swap.passes`). Either way the first pass records
    the order, and later ones are planned and fetched ahead.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> _ = enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear},
    ...                            dict(computation_device="cpu"), vram_limit=0)
    >>> model(torch.ones(1, 4)).shape, model.vram_management_enabled
    (torch.Size([1, 4]), True)
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _ATTRIBUTE in model.__dict__:
        raise ValueError(f"{type(model).__name__} already has vram management enabled")
    _refuse_unrecorded_merges(model)
    module_map = resolve_module_map(module_map)
    vram_config = _with_quantize(model, vram_config, quantize)
    whole = next((w for t, w in module_map.items() if isinstance(model, t)), None)
    if whole is not None:
        return _wrap_whole(model, whole, vram_config, vram_limit, disk_map, prefetch, bypass_page_cache)
    binding = Binding.create(
        model, vram_config, vram_limit, disk_map, prefetch=prefetch, bypass_page_cache=bypass_page_cache
    )
    matches = _matches(model, module_map)
    # Every weight is found and checked before the model is changed at all.
    covered = set()
    for _parent, _attr, name, child, cls in matches:
        recursive = not issubclass(cls, AutoWrappedNonRecurseModule)
        covered.update(id(m) for m in (child.modules() if recursive else [child]))
        binding.builder.slots(child, name, recursive=recursive, required=binding.on_disk)
    loose = loose_tensors(model, binding.builder, covered)
    binding.builder.raise_problems(type(model).__name__)

    wrapped: dict[int, torch.nn.Module] = {}
    for parent, attr, name, child, cls in matches:
        if id(child) not in wrapped:  # a module shared by two parents is wrapped once
            wrapped[id(child)] = cls(child, name=name, binding=binding)
        setattr(parent, attr, wrapped[id(child)])
    materialise(loose, binding.config.device, binding.config.computation)
    return _enabled(model, binding)


def _refuse_unrecorded_merges(model: torch.nn.Module) -> None:
    """A LoRA merged into a meta weight without a record of it would be read from disk unmerged:
    refused before anything changes. Recorded merges are added after each fetch."""
    state = adapter_state(model)
    if state is not None and state.merged:
        meta = {name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
        refuse_unrecorded_merge(state, meta.__contains__)


def _wrap_whole(
    model: torch.nn.Module,
    cls: type,
    vram_config: Mapping[str, Any],
    vram_limit: Any,
    disk_map: Any,
    prefetch: bool,
    bypass_page_cache: bool,
) -> torch.nn.Module:
    """``model`` wrapped whole, its onload and preparing states those of computation."""
    config = {k: v for k, v in vram_config.items() if not k.startswith(("onload_", "preparing_"))}
    if config != dict(vram_config):
        log.info("%s is wrapped whole: its onload and preparing states are those of computation", type(model).__name__)
    binding = Binding.create(model, config, vram_limit, disk_map, prefetch=prefetch, bypass_page_cache=bypass_page_cache)
    recursive = not issubclass(cls, AutoWrappedNonRecurseModule)
    binding.builder.slots(model, "", recursive=recursive, required=binding.on_disk)
    covered = {id(m) for m in model.modules()} if recursive else {id(model)}
    loose = loose_tensors(model, binding.builder, covered)
    binding.builder.raise_problems(type(model).__name__)
    wrapper = cls(model, binding=binding)
    materialise(loose, binding.config.device, binding.config.computation)
    model.__dict__[_ATTRIBUTE] = binding
    return _enabled(wrapper, binding)


def _enabled(model: torch.nn.Module, binding: Binding) -> torch.nn.Module:
    """Mark ``model``'s calls and flag it as managed, as pipelines check."""
    bound_calls(model, binding.runtime)
    model.__dict__[_ATTRIBUTE] = binding
    model.vram_management_enabled = True
    return model


def _with_quantize(model: torch.nn.Module, vram_config: Mapping[str, Any], quantize: Any) -> Mapping[str, Any]:
    """``vram_config`` with the storage dtype ``quantize`` names as the resting dtype; a quantization
    that means anything else is refused."""
    if quantize is None:
        return vram_config
    if isinstance(quantize, torch.dtype):
        if quantize not in _QUANTIZE_DTYPES:
            raise ValueError(f"quantize={quantize}: pass one of {', '.join(map(str, _QUANTIZE_DTYPES))}")
        if not isinstance(vram_config, Mapping):
            return vram_config  # VramConfig.from_dict says what is wrong with it
        config = dict(vram_config)
        for state in ("offload", "onload"):
            current = config.get(f"{state}_dtype")
            if current not in (None, DISK, quantize, config.get("computation_dtype")):
                raise ValueError(
                    f"quantize={quantize} conflicts with vram_config['{state}_dtype']={current}; pass one of them"
                )
            if current == DISK:  # still read from disk, rounded to the storage dtype on every read
                config[f"{state}_device"] = DISK
            config[f"{state}_dtype"] = quantize
        return config
    is_quantized = getattr(quantize, "is_quantized_linear", None)
    if not callable(is_quantized):
        raise ValueError(f"quantize={quantize!r}: pass a storage dtype such as torch.float8_e4m3fn, or None")
    layers = [name for name, module in model.named_modules() if is_quantized(module)]
    if layers:
        method = getattr(quantize, "method", type(quantize).__name__)
        raise ValueError(
            f"quantize: {len(layers)} layer(s) of {type(model).__name__} are quantized by {method}'s backend "
            f"({', '.join(layers[:3])}{', …' if len(layers) > 3 else ''}); vramfx streams plain tensors and does "
            "not run those kernels. Load the model with QuantizeConfig(mode='dequant_once') or without quantize, "
            "and pass quantize=torch.float8_e4m3fn (weights rest in fp8, cast up per call) to save memory"
        )
    return vram_config


def offload(model: torch.nn.Module) -> None:
    """Move every wrapped module's weights to their offload state and free what vramfx holds on the device.

    For pipelines that move whole components between uses. Calling the model afterwards works
    (weights stream from the offload state).
    """
    binding = _binding(model)
    binding.move(binding.wrappers, 0)
    binding.runtime.release()


def onload(model: torch.nn.Module) -> None:
    """Move every wrapped module's weights to their onload state (where they wait while in use)."""
    binding = _binding(model)
    binding.move(binding.wrappers, 1)


def swap_stats(model: torch.nn.Module) -> SwapStats:
    """What vramfx holds for ``model`` on the device, and what its latest call fetched."""
    return _binding(model).runtime.stats()


def _binding(model: torch.nn.Module) -> Binding:
    binding = model.__dict__.get(_ATTRIBUTE)
    if binding is None:
        raise ValueError(f"{type(model).__name__} has no vram management; call enable_vram_management first")
    return binding


def _matches(
    model: torch.nn.Module, module_map: Mapping[type, type]
) -> list[tuple[torch.nn.Module, str, str, torch.nn.Module, type]]:
    """``(parent, attribute, qualified name, module, wrapper class)`` for each matched module; the
    submodules of a non-recursive match are matched in turn."""
    found = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        adapter = is_adapter_layer(module)
        for attr, child in module.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, SwapSwitches) or (adapter and attr != "base_layer"):
                continue  # a PEFT layer's adapters are not streamed: they stay on the device
            cls = next((w for t, w in module_map.items() if isinstance(child, t)), None)
            if cls is not None:
                found.append((module, attr, name, child, cls))
            if cls is None or issubclass(cls, AutoWrappedNonRecurseModule):
                walk(child, name)

    walk(model, "")
    return found
