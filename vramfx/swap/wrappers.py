"""The wrapped modules: ``AutoWrappedModule`` for any module, ``AutoWrappedLinear`` for ``nn.Linear``.

Same names and constructor keywords as the well-known layer-swap implementation. A wrapper's
parameters rest in their offload (or onload) state; for each forward the runtime puts them on
the computation device in the computation dtype — kept there when the plan keeps them, else
streamed, fetched ahead along the recorded module order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vramfx.swap.config import VramConfig, parse_vram_limit
from vramfx.swap.patch import bound_calls
from vramfx.swap.runtime import SwapRuntime
from vramfx.swap.units import Unit, UnitBuilder, move_home
from vramfx.weights import as_source

log = logging.getLogger(__name__)


@dataclass
class Binding:
    """What the wrapped modules of one model share: the config, the weights, the runtime."""

    config: VramConfig
    builder: UnitBuilder
    runtime: SwapRuntime

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        vram_config: Mapping[str, Any] | None,
        vram_limit: int | float | str | None,
        disk_map: Any,
        *,
        prefetch: bool = True,
        bypass_page_cache: bool = False,
    ) -> "Binding":
        """Check the arguments and make the runtime (nothing is moved yet)."""
        config = VramConfig.from_dict(vram_config)
        limit_bytes = parse_vram_limit(vram_limit, config.device)
        source = as_source(disk_map) if disk_map is not None else None
        if source is None and (config.offload.on_disk or config.onload.on_disk):
            raise ValueError('vram_config places weights on "disk", but no disk_map was given; pass disk_map=DiskMap(path)')
        runtime = SwapRuntime(
            config.device, limit_bytes=limit_bytes, prefetch=prefetch, bypass_page_cache=bypass_page_cache
        )
        return cls(config, UnitBuilder(model, source), runtime)

    @property
    def on_disk(self) -> bool:
        return self.config.offload.on_disk or self.config.onload.on_disk

    def unit(self, root: torch.nn.Module, name: str) -> Unit:
        """The unit of ``root``'s parameters (all of its submodules'), resting in the offload state."""
        slots = self.builder.slots(root, name, recursive=True, required=self.on_disk)
        self.builder.raise_problems(name or type(root).__name__)
        unit = Unit(
            name or type(root).__name__,
            slots,
            device=self.config.device,
            compute_dtypes=tuple(self.config.computation.dtype_for(s.dtype) for s in slots),
        )
        move_home(unit, self.config.offload)
        preparing = self.config.preparing.dtype
        if preparing is not None and any(
            s.dtype.is_floating_point and unit.held_dtype(i) != preparing for i, s in enumerate(slots)
        ):
            log.info(
                "%s: kept weights are held as streamed ones are (%s), not in preparing_dtype %s, so "
                "every module computes on the same values",
                unit.name, sorted({str(unit.held_dtype(i)) for i in range(len(slots))}), preparing,
            )
        return self.runtime.add(unit)


class SwapSwitches:
    """``offload()`` / ``onload()`` on a wrapped module: move its weights between the two states."""

    _vramfx_binding: Binding
    _vramfx_unit: Unit

    def offload(self) -> None:
        """Move this module's weights to their offload state (and drop a kept copy)."""
        move_home(self._vramfx_unit, self._vramfx_binding.config.offload)
        self._vramfx_binding.runtime.homes_changed()

    def onload(self) -> None:
        """Move this module's weights to their onload state."""
        move_home(self._vramfx_unit, self._vramfx_binding.config.onload)
        self._vramfx_binding.runtime.homes_changed()

    def _vramfx_bind(self, root: torch.nn.Module, name: str, binding: Binding | None, **standalone: Any) -> None:
        """Join ``binding``'s runtime, or (used on its own) make a runtime of its own."""
        own = binding is None
        if binding is None:
            binding = Binding.create(root, **standalone)
        self.__dict__["_vramfx_binding"] = binding
        self.__dict__["_vramfx_unit"] = binding.unit(root, name)
        if own:
            bound_calls(self, binding.runtime)  # type: ignore[arg-type]


class AutoWrappedModule(SwapSwitches, torch.nn.Module):
    """Any module whose parameters (its submodules' included) are moved in around each forward.

    The wrapped module is ``self.module``, so state-dict names gain ``.module``; weights are
    still found in ``disk_map`` under the model's original names.

    Parameters
    ----------
    module:
        The module to wrap.
    name:
        Its qualified name in the model: the prefix of its weights in ``disk_map``.
    disk_map:
        Where ``"disk"`` weights are read from (a :class:`vramfx.DiskMap`).
    vram_limit:
        Used only when the wrapper is built on its own (``enable_vram_management`` shares one
        limit across the model).
    **vram_config:
        The 8 ``vram_config`` keys (``offload_dtype``, ``offload_device``, ... ``computation_device``).

    Examples
    --------
    >>> norm = AutoWrappedModule(torch.nn.LayerNorm(4), computation_device="cpu")
    >>> norm(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str = "",
        disk_map: Any = None,
        vram_limit: int | float | str | None = None,
        binding: Binding | None = None,
        **vram_config: Any,
    ) -> None:
        super().__init__()
        self.module = module
        self._vramfx_bind(module, name, binding, vram_config=vram_config, vram_limit=vram_limit, disk_map=disk_map)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        unit = self._vramfx_unit
        return self._vramfx_binding.runtime.run(unit, lambda tensors: unit.call_with(tensors, self.module, args, kwargs))


class AutoWrappedLinear(SwapSwitches, torch.nn.Linear):
    """An ``nn.Linear`` (still one, for ``isinstance``) whose weight and bias are moved in per call.

    Parameters are as for :class:`AutoWrappedModule`; ``module`` must be an ``nn.Linear``.
    State-dict names are the Linear's own.

    Examples
    --------
    >>> layer = AutoWrappedLinear(torch.nn.Linear(4, 2), computation_device="cpu", vram_limit=0)
    >>> layer(torch.ones(1, 4)).shape
    torch.Size([1, 2])
    """

    def __init__(
        self,
        module: torch.nn.Linear,
        *,
        name: str = "",
        disk_map: Any = None,
        vram_limit: int | float | str | None = None,
        binding: Binding | None = None,
        **vram_config: Any,
    ) -> None:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"AutoWrappedLinear wraps an nn.Linear; got {type(module).__name__} (use AutoWrappedModule)")
        super().__init__(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=module.weight.dtype
        )
        self.weight = module.weight
        if module.bias is not None:
            self.bias = module.bias
        self._vramfx_bind(self, name, binding, vram_config=vram_config, vram_limit=vram_limit, disk_map=disk_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._vramfx_binding.runtime.run(self._vramfx_unit, lambda tensors: F.linear(x, *tensors))
