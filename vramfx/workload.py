"""Workloads: a model and an example call, named by a target such as ``workload.py:build``.

The command line plans a model without running it, so it needs the model and an example of
its inputs. A user writes them in a function — in a file or an importable module — that
returns ``model``, ``(model, args)`` or ``(model, args, kwargs)``. The model may have meta
parameters and the inputs may be meta tensors: nothing is computed with them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vramfx.errors import VramfxError

_FORMS = "model, (model, args) or (model, args, kwargs)"


class TargetError(VramfxError):
    """A target that cannot be found, imported, called, or that returns no model."""


@dataclass(frozen=True)
class Workload:
    """A model and one example call of it."""

    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineWorkload:
    """A whole diffusers pipeline to plan: its class, the folder it was saved to, and the keyword
    arguments of one call (``prompt``, ``height``, ``num_inference_steps``, ...)."""

    pipeline: Any
    root: str | Path
    call: dict[str, Any] = field(default_factory=dict)


def load_workload(target: str) -> Workload | PipelineWorkload:
    """Find the function ``target`` names, call it, and check what it returns.

    Parameters
    ----------
    target:
        ``path/to/file.py:function`` or ``package.module:function``; the function may be a
        dotted attribute path (``module:Factory.build``). A file's folder is put first on
        ``sys.path`` while it is imported, so it can import its neighbours.

    Returns
    -------
    Workload, or the :class:`PipelineWorkload` the function returned

    Raises
    ------
    TargetError
        If the file or module does not exist or fails to import, the function is missing or
        not callable, raises, or returns something other than the accepted forms. The
        original exception, if any, is chained.

    Examples
    --------
    A file ``wan.py`` with ``def build(): return model, (), {"hidden_states": x, ...}``:

    >>> workload = load_workload("wan.py:build")  # doctest: +SKIP
    >>> type(workload.model).__name__  # doctest: +SKIP
    'WanTransformer3DModel'
    """
    function = resolve_target(target)
    try:
        result = function()
    except (Exception, SystemExit) as exc:  # any failure in user code is the user's to see, in one line
        raise TargetError(f"{target} raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if isinstance(result, PipelineWorkload):
        return result
    return as_workload(result, target)


def resolve_target(target: str) -> Callable[[], Any]:
    """The callable ``target`` names, imported but not called.

    Raises
    ------
    TargetError
        As :func:`load_workload`, for everything up to the call.
    """
    where, sep, attribute = target.rpartition(":")
    if not sep or not where or not attribute:
        raise TargetError(
            f"target {target!r} must be path/to/file.py:function or package.module:function"
        )
    module = _import_file(where) if _is_path(where) else _import_module(where)
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise TargetError(f"{where} has no attribute {attribute!r} (target {target!r})")
        value = getattr(value, part)
    if isinstance(value, torch.nn.Module) or not callable(value):
        raise TargetError(
            f"{target} is an object of type {type(value).__name__}, not a function; it must name a function that "
            f"returns {_FORMS}"
        )
    return value


def as_workload(result: Any, target: str = "the target") -> Workload:
    """Check a target's return value and turn it into a :class:`Workload`.

    ``args`` may be a tuple or list, or one tensor; a dict in the place of ``args`` is taken
    as ``kwargs``.

    Raises
    ------
    TargetError
        If ``result`` is none of the accepted forms.
    """
    if isinstance(result, torch.nn.Module):
        return Workload(result)
    if isinstance(result, (tuple, list)) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module):
        model, args = result[0], result[1]
        kwargs = result[2] if len(result) == 3 else {}
        if isinstance(args, Mapping) and len(result) == 2:
            args, kwargs = (), args
        if isinstance(args, torch.Tensor):
            args = (args,)
        if not isinstance(args, (tuple, list)):
            raise TargetError(f"{target} returned args of type {type(args).__name__}; args must be a tuple")
        if not isinstance(kwargs, Mapping):
            raise TargetError(f"{target} returned kwargs of type {type(kwargs).__name__}; kwargs must be a dict")
        return Workload(model, tuple(args), dict(kwargs))
    return_type = type(result).__name__
    if isinstance(result, (tuple, list)):
        return_type += f" of {len(result)} ({', '.join(type(r).__name__ for r in result[:3])}" + (
            ", …)" if len(result) > 3 else ")"
        )
    raise TargetError(f"{target} returned {return_type}; it must return {_FORMS}, with model a torch.nn.Module")


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_file(where: str) -> Any:
    path = Path(where)
    if not path.is_file():
        raise TargetError(f"{where}: no such file")
    name = f"_vramfx_workload_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{where} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a script that parses its own argv exits on import
        del sys.modules[name]
        raise TargetError(f"importing {where} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        sys.path.remove(folder)
    return module


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
            raise TargetError(f"no module named {where!r} (is it installed, or on PYTHONPATH?)") from exc
        raise TargetError(f"importing {where} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    except (Exception, SystemExit) as exc:
        raise TargetError(f"importing {where} failed: {type(exc).__name__}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"
