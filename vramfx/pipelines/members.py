"""Pipeline components as the pipeline sees them, and the one-at-a-time protocol they follow.

A :class:`PipelineMember` stands where the component stood: ``.config``, ``.dtype`` and other
attributes come from the model, calls of its entry points (``forward``, a VAE's ``decode`` and
``encode``) go to the unit compiled for them. Before a unit runs, the :class:`Turns` it belongs to
releases the unit that ran before it — its arena always, its resident weights unless it is kept
across generations — so no two units hold their working memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vramfx.measure import release_freed_memory

#: The methods of a component, besides ``forward``, that run its weights and are compiled as units.
ENTRY_METHODS = ("decode", "encode")


class Turns:
    """Which unit holds its working memory now; switching releases the previous one."""

    def __init__(self) -> None:
        self.current: Any = None

    def enter(self, unit: Any) -> None:
        """Make ``unit`` the running one: the previous unit's arena (and, unless kept, its
        resident weights) is freed first."""
        previous = self.current
        if previous is unit:
            return
        self.current = None
        if previous is not None:
            previous.compiled.release(keep_resident=previous.kept)
            if unit.options.device.type == "cpu":
                release_freed_memory(collect_garbage=False)  # the budget is RssAnon: hand the freed arena back first
        self.current = unit

    def release_all(self, *, keep_kept: bool = True) -> None:
        """End of a generation: free the running unit's memory (kept units keep their weights)."""
        previous, self.current = self.current, None
        if previous is not None:
            previous.compiled.release(keep_resident=keep_kept and previous.kept)


class PipelineMember(torch.nn.Module):
    """A component of a compiled pipeline: the model's attributes, its entry points compiled.

    ``call(member, method, args, kwargs)`` runs an entry point; the pipeline supplies it (it
    plans units on first use and takes turns).
    """

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device,
                 call: Callable[["PipelineMember", str, tuple, dict], Any]) -> None:
        super().__init__()
        self.__dict__["_vramfx_name"] = name
        self.__dict__["_vramfx_model"] = model
        self.__dict__["_vramfx_device"] = device
        self.__dict__["_vramfx_call"] = call

    @property
    def name(self) -> str:
        return self.__dict__["_vramfx_name"]

    @property
    def model(self) -> torch.nn.Module:
        """The component's model, with meta parameters."""
        return self.__dict__["_vramfx_model"]

    @property
    def device(self) -> torch.device:
        return self.__dict__["_vramfx_device"]

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.get_default_dtype())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_vramfx_call"](self, "forward", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("_vramfx_model")
        if model is None:
            return super().__getattr__(name)
        if name in ENTRY_METHODS and callable(getattr(model, name, None)):
            call = self.__dict__["_vramfx_call"]

            def entry(*args: Any, **kwargs: Any) -> Any:
                return call(self, name, args, kwargs)

            return entry
        return getattr(model, name)

    def __repr__(self) -> str:
        return f"PipelineMember({self.name}: {type(self.model).__name__})"

