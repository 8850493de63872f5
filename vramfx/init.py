"""skip_model_initialization: build a module's structure without allocating or initialising weights."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from vramfx.adapters.hosting import install as install_adapter_hosting
from vramfx.adapters.hosting import mark_streamed

__all__ = ["skip_model_initialization"]

_INIT_NAMES = tuple(
    name
    for name in dir(torch.nn.init)
    if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name))
)

_TORCH_NN_PACKAGES = ("torch.nn", "torch.ao.nn")


@contextmanager
def skip_model_initialization(device: torch.device | str = "meta") -> Iterator[None]:
    """Construct modules with parameters on ``device`` and without running any init kernel.

    Inside the block:

    - every parameter a module registers is replaced by an uninitialised one of the same shape,
      dtype, ``requires_grad`` and ``Parameter`` subclass on ``device`` (``"meta"`` by default,
      which takes no memory at all);
    - the ``torch.nn.init`` functions (``normal_``, ``kaiming_uniform_``, ...; also where
      ``torch.nn`` modules imported them by name, and the copies transformers keeps) return
      their argument untouched when it is a parameter or a meta tensor, so neither
      ``reset_parameters`` nor transformers' ``post_init``/``_init_weights`` spend time on
      weights that will be overwritten by loading;
    - buffers are left alone: they are real and keep their computed values (a rotary
      ``inv_freq``, a position-id table), because ``compile`` takes them from the module.

    PEFT adapters added later to a layer built here (``add_adapter``, ``load_lora_adapter``) keep
    their weights in host memory, where :func:`vramfx.compile` plans them, instead of following
    the meta weight they wrap (:mod:`vramfx.adapters.hosting`).

    Everything is restored on exit, also when the block raises. Blocks nest; the innermost
    ``device`` wins. The patches are process-wide while the block runs, as with accelerate's
    ``init_empty_weights``: do not construct models in other threads meanwhile.

    Parameters
    ----------
    device:
        Where parameters are created. ``"meta"`` (default) takes no memory; a real device
        gives uninitialised memory there (contents are garbage until loaded).

    Examples
    --------
    >>> with skip_model_initialization():
    ...     layer = nn.Linear(4096, 4096)
    >>> layer.weight.device
    device(type='meta')

    Load weights afterwards with ``assign=True``, so the loaded tensors replace the meta ones:

    >>> _ = layer.load_state_dict(
    ...     {"weight": torch.zeros(4096, 4096), "bias": torch.zeros(4096)}, assign=True
    ... )
    """
    target = torch.device(device)
    handle = register_module_parameter_registration_hook(_param_mover(target))
    undo: list[tuple[Any, str, Any]] = []
    try:
        _patch_init_functions(undo)
        yield
    finally:
        for container, name, old in reversed(undo):
            _set(container, name, old)
        handle.remove()
    install_adapter_hosting()


def _param_mover(device: torch.device) -> Callable[[nn.Module, str, nn.Parameter | None], Any]:
    """A parameter-registration hook that swaps each new parameter for an empty one on ``device``."""

    def hook(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device == device or _is_lazy(param):
            return None
        data = torch.empty_like(param.detach(), device=device)
        # _make_subclass keeps Parameter subclasses without calling their constructors.
        moved = torch.Tensor._make_subclass(type(param), data, param.requires_grad)
        moved.__dict__.update(param.__dict__)
        if moved.is_meta:
            mark_streamed((moved,))
        return moved

    return hook


def _is_lazy(param: torch.Tensor) -> bool:
    """Lazy modules' parameters have no shape yet; they are left to materialise themselves."""
    return isinstance(param, nn.parameter.UninitializedTensorMixin)


def _skip_for_weights(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap an init function so it leaves parameters and meta tensors untouched."""

    @functools.wraps(fn)
    def init_fn(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter) or tensor.is_meta:
            return tensor
        return fn(tensor, *args, **kwargs)

    return init_fn


def _patch_init_functions(undo: list[tuple[Any, str, Any]]) -> None:
    """Replace every binding of the current init functions; record how to undo each."""
    current = {n: vars(torch.nn.init)[n] for n in _INIT_NAMES}
    wrapped = {n: _skip_for_weights(fn) for n, fn in current.items()}
    # torch.nn.modules.* bind some init functions at import (``from torch.nn.init import ...``).
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(_TORCH_NN_PACKAGES):
            continue
        namespace = vars(module)
        for name, fn in current.items():
            if namespace.get(name) is fn:
                undo.append((module, name, fn))
                _set(module, name, wrapped[name])
    # transformers keeps its own references and calls them from its guarded init functions.
    hf_init = sys.modules.get("transformers.initialization")
    table = getattr(hf_init, "TORCH_INIT_FUNCTIONS", None) if hf_init is not None else None
    if isinstance(table, dict):
        for name, value in list(table.items()):
            if callable(value):
                undo.append((table, name, value))
                table[name] = _skip_for_weights(value)


def _set(container: Any, name: str, value: Any) -> None:
    """Set ``name`` on a module or a dict."""
    if isinstance(container, dict):
        container[name] = value
    else:
        setattr(container, name, value)
