"""Instance-level ``forward`` wrappers: a model's call boundaries, and a module's weight swap.

Setting ``module.forward`` on the instance leaves the class, the module tree and state-dict
names as they are, keeps ``nn.Module.__call__``'s fast path (no hooks), and runs the wrapper
for ``module(...)`` and ``module.forward(...)`` alike. ``functools.wraps`` keeps the signature
visible to code that inspects it (transformers' ``generate`` does). Each function returns an
undo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from vramfx.swap.runtime import SwapRuntime
from vramfx.swap.units import Unit


def bound_calls(model: torch.nn.Module, runtime: SwapRuntime) -> Callable[[], None]:
    """Tell ``runtime`` where each call of ``model`` begins and ends; returns the undo."""
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_call(*args: Any, **kwargs: Any) -> Any:
        runtime.begin_call()
        try:
            output = forward(*args, **kwargs)
        except BaseException:
            runtime.end_call(failed=True)
            raise
        runtime.end_call()
        return output

    return _set_forward(model, forward_in_call)


def swapped_forward(module: torch.nn.Module, unit: Unit, runtime: SwapRuntime) -> Callable[[], None]:
    """Run ``module``'s forward with ``unit``'s weights swapped in; returns the undo."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_with_weights(*args: Any, **kwargs: Any) -> Any:
        return runtime.run(unit, lambda tensors: unit.call_with(tensors, forward, args, kwargs))

    return _set_forward(module, forward_with_weights)


def _set_forward(module: torch.nn.Module, forward: Callable) -> Callable[[], None]:
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = forward

    def undo() -> None:
        if had:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo
