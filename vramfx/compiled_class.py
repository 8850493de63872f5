"""What ``compile`` returns is an instance of the model's own class.

Pipelines and loaders check types: diffusers' ``DiffusionPipeline.from_pretrained(root,
transformer=fast)`` refuses anything that is not a ``ModelMixin``, transformers reads class
attributes (``main_input_name``, ``_supports_cache_class``) and calls mixin methods. So the
compiled model's class is made on the fly, once per model class: ``Compiled[X]`` subclasses both
:class:`~vramfx.compiled.CompiledModule` (calls, ``.to``, ``state_dict``, refusals) and ``X``
(everything else: config, mixin methods, ``isinstance``). Its ``forward`` shows ``X.forward``'s
signature, which transformers' ``generate`` inspects to choose its arguments.

Methods of ``X`` run on the compiled model; attributes it lacks are read from the model, and
walking its submodules walks the model's (so a method that changes them, such as
``set_attn_processor``, changes the model, and the next call sees it). Methods that would change
weights in ways a plan built on streamed weights cannot follow are refused with what to do.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch

from vramfx.compiled import CompiledModule

#: Methods of the model's class that change its weights or their layout, or prepare training:
#: what to do instead.
REFUSED: dict[str, str] = {
    "fuse_qkv_projections": "fuse the projections in the checkpoint (or compile the unfused model)",
    "unfuse_qkv_projections": "compile the model in the layout its checkpoint stores",
    "resize_token_embeddings": "resize the original model, save it, and compile the saved weights",
    "enable_gradient_checkpointing": "a compiled model runs inference only; train the original model",
    "gradient_checkpointing_enable": "a compiled model runs inference only; train the original model",
    "tie_weights": "tied weights are read once from the checkpoint already; nothing to do",
    "init_weights": "weights come from the checkpoint a compiled model was compiled with",
}

_CLASSES: dict[type, type] = {}
_LOCK = threading.Lock()


def compiled_class(model_cls: type[torch.nn.Module]) -> type[CompiledModule]:
    """The class of a compiled ``model_cls``: a subclass of both, made once per class.

    Examples
    --------
    >>> cls = compiled_class(torch.nn.Linear)
    >>> issubclass(cls, torch.nn.Linear), issubclass(cls, CompiledModule), cls is compiled_class(torch.nn.Linear)
    (True, True, True)
    """
    if issubclass(model_cls, CompiledModule):
        return model_cls
    with _LOCK:
        cls = _CLASSES.get(model_cls)
        if cls is None:
            cls = _CLASSES[model_cls] = _make(model_cls)
        return cls


def _make(model_cls: type[torch.nn.Module]) -> type[CompiledModule]:
    namespace: dict[str, Any] = {
        # Libraries record a component as (module's top package, class name), e.g. in a
        # pipeline's config: the model's, so a saved pipeline names the model's class.
        "__module__": model_cls.__module__,
        "__qualname__": f"Compiled[{model_cls.__qualname__}]",
        "__doc__": f"{model_cls.__name__} compiled by vramfx.compile: called like the model, its weights streamed "
        "under a budget.",
        "forward": _forward_like(model_cls),
        "_vramfx_model_class": model_cls,
    }
    own = _defined_below_module(model_cls)
    for name, value in own.items():
        if name in _adapter_methods(model_cls):
            namespace[name] = _on_model(name)
        elif name in REFUSED and callable(value):
            namespace[name] = _refusal(model_cls, name)
        elif _is_container_dunder(name, value):
            namespace[name] = _on_model(name)
    try:
        return type(model_cls.__name__, (CompiledModule, model_cls), namespace)
    except TypeError as exc:  # a metaclass or layout conflict: the class cannot be combined
        raise TypeError(f"vramfx cannot make a compiled subclass of {model_cls.__qualname__}: {exc}") from None


def _defined_below_module(model_cls: type) -> dict[str, Any]:
    """Attributes the model's classes define themselves (above torch.nn.Module in its MRO)."""
    found: dict[str, Any] = {}
    for klass in reversed(model_cls.__mro__):
        if klass is object or klass is torch.nn.Module or klass in torch.nn.Module.__mro__:
            continue
        found.update(vars(klass))
    return found


def _adapter_methods(model_cls: type) -> set[str]:
    """Methods of the libraries' adapter mixins (``PeftAdapterMixin`` in diffusers and transformers:
    ``add_adapter``, ``load_lora_adapter``, ``set_adapters``, ``fuse_lora``, ...). They run on the
    model, whose layers the adapters wrap and whose adapter state every call follows
    (:mod:`vramfx.adapters`), not on the compiled model's own (empty) module."""
    return {
        name
        for klass in model_cls.__mro__
        if klass.__name__ == "PeftAdapterMixin"
        for name, value in vars(klass).items()
        if callable(value) or isinstance(value, property)
    }


def _is_container_dunder(name: str, value: Any) -> bool:
    """``len``/``iter``/indexing of a container module (``nn.Sequential``) read the model: the
    compiled model holds no submodules of its own, and ``len(fast) == 0`` would make it falsy."""
    return name in {"__len__", "__iter__", "__getitem__", "__contains__", "__bool__", "__reversed__"} and callable(value)


def _on_model(name: str) -> Callable[..., Any]:
    def method(self: CompiledModule, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, name)(*args, **kwargs)

    method.__name__ = name
    return method


def _refusal(model_cls: type, name: str) -> Callable[..., Any]:
    def refused(self: CompiledModule, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{model_cls.__name__}.{name}() cannot run on a compiled model: its weights are streamed from "
            f"the checkpoint under a plan made for them. Instead: {REFUSED[name]}"
        )

    refused.__name__ = name
    return refused


def _forward_like(model_cls: type) -> Callable[..., Any]:
    """CompiledModule.forward with the model's forward signature and docs (``generate`` and
    pipelines inspect which arguments ``forward`` takes)."""

    @functools.wraps(model_cls.forward, assigned=("__doc__", "__name__", "__qualname__"))
    def forward(self: CompiledModule, *args: Any, **kwargs: Any) -> Any:
        return CompiledModule.forward(self, *args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(model_cls.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    return forward
