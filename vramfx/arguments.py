"""Checks of public arguments: each error names the argument, what it got and what to pass.

Public entry points call these first, before opening a file or allocating anything, so a wrong
argument never surfaces as a ``TypeError`` or ``OverflowError`` from deep inside.

Examples
--------
>>> require_int("calls", 10, minimum=1)
10
>>> require_int("calls", "10", minimum=1)
Traceback (most recent call last):
    ...
TypeError: calls must be an int >= 1, got '10' (str)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def require_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    bound = f" >= {minimum}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{bound}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int{bound}, got {value}")
    return value


def require_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def require_device(name: str, value: Any) -> torch.device:
    """``value`` as a ``torch.device``: a device, a string such as ``"cuda:0"``, or a CUDA index."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda:0', got {value!r} ({type(value).__name__})")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name}={value!r} is not a device ({exc}); pass e.g. 'cpu' or 'cuda:0'") from None


def require_call(example_args: Any, example_kwargs: Any) -> tuple[tuple, dict[str, Any]] | None:
    """An example call as ``(args, kwargs)``; None when neither is given."""
    if example_args is None and example_kwargs is None:
        return None
    if example_args is not None and not isinstance(example_args, (tuple, list)):
        raise TypeError(
            f"example_args must be a tuple of the call's positional arguments, e.g. example_args=(x,); "
            f"got a {type(example_args).__name__}"
        )
    if example_kwargs is not None and not (
        isinstance(example_kwargs, Mapping) and all(isinstance(k, str) for k in example_kwargs)
    ):
        raise TypeError(
            "example_kwargs must be a dict of the call's keyword arguments by name, e.g. "
            f"example_kwargs={{'input_ids': ids}}; got a {type(example_kwargs).__name__}"
        )
    return tuple(example_args or ()), dict(example_kwargs or {})
