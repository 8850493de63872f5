"""The wrapped modules: ``AutoWrappedModule`` for any module, ``AutoWrappedNonRecurseModule`` for a
module's own parameters, ``AutoWrappedLinear`` for ``nn.Linear``.

Same names, constructor arguments, states and attributes as the well-known layer-swap
implementation (DiffSynth-Studio's ``diffsynth.core.vram.layers``). A wrapper's
parameters rest in their offload (or onload) state; for each forward the runtime puts them on
the computation device in the computation dtype — kept there when the plan keeps them, else
streamed, fetched ahead along the recorded module order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vramfx.swap.config import KEYS, Placement, VramConfig, parse_vram_limit
from vramfx.swap.interop import join_lora_fusion, join_lora_hot_load
from vramfx.swap.linear_ops import FP8_DTYPES, fp8_linear, lora_forward
from vramfx.swap.loading import honour_load_state_dict
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
    wrappers: list[SwapSwitches] = field(default_factory=list)

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

    def placement(self, state: int) -> Placement:
        """Where weights rest in ``state``: 0 offload, 1 onload, 2 preparing (the computation
        device, in the preparing dtype or the one they rest in)."""
        config = self.config
        return (config.offload, config.onload, config.preparing)[state]

    def move(self, wrappers: Sequence[SwapSwitches], state: int) -> None:
        """Move the weights of ``wrappers`` to ``state``; the runtime plans again if any moved."""
        placement = self.placement(state)
        moved = False
        for wrapper in wrappers:
            moved |= move_home(wrapper._vramfx_unit, placement)
            wrapper.__dict__["state"] = state
        if moved:
            self.runtime.homes_changed()

    def unit(self, root: torch.nn.Module, name: str, *, recursive: bool = True) -> Unit:
        """The unit of ``root``'s parameters (with its submodules' when ``recursive``), resting in the
        offload state."""
        slots = self.builder.slots(root, name, recursive=recursive, required=self.on_disk)
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
    """The states of a wrapped module's weights, and what every wrapper shares.

    ``offload()`` / ``onload()`` / ``preparing()`` move its weights to that state of ``vram_config``
    (``state`` is 0, 1 or 2 after each, as the well-known wrappers count them). Unlike those,
    ``forward`` never changes the state: kept weights are chosen by the planner under ``vram_limit``
    and held by the runtime, so every module computes on the values its state gives. Weights a
    module holds on the computation device after ``preparing()`` (or an ``onload()`` there) are the
    model's own memory: used where they lie, outside ``vram_limit``.
    """

    _vramfx_binding: Binding
    _vramfx_unit: Unit
    state: int
    name: str

    def offload(self) -> None:
        """Move this module's weights to their offload state (and drop a kept copy)."""
        self._vramfx_binding.move([self], 0)

    def onload(self) -> None:
        """Move this module's weights to their onload state."""
        self._vramfx_binding.move([self], 1)

    def preparing(self) -> None:
        """Move this module's weights to their preparing state: on the computation device."""
        self._vramfx_binding.move([self], 2)

    @property
    def vramfx_adapter_home(self) -> tuple[torch.device, torch.dtype | None]:
        """Where PEFT adapters wrapping this module keep their weights: the computation device, in
        the computation dtype (:func:`vramfx.adapters.hosting.adapter_home`). Like hot-loaded LoRA
        lists, they are used there and not counted in ``vram_limit``."""
        config = self._vramfx_binding.config
        dtype = next((s.dtype for s in self._vramfx_unit.slots if s.dtype.is_floating_point), None)
        return config.device, config.computation.dtype_for(dtype) if dtype is not None else None

    @property
    def vramfx_fusion_anchor(self) -> torch.Tensor | None:
        """What a PEFT LoRA merged into this module's ``weight`` is recorded against: the runtime
        adds it after each fetch, and the weight where it rests is never written
        (:mod:`vramfx.adapters.fusions`). None when the module has no weight it moves."""
        unit = self.__dict__.get("_vramfx_unit")
        weight = getattr(self, "weight", None)
        if unit is None or weight is None:
            return None
        return next((unit.anchors[i] for i, face in enumerate(unit.face) if face is weight), None)

    def _vramfx_bind(
        self, root: torch.nn.Module, name: str, binding: Binding | None, *, recursive: bool = True, **standalone: Any
    ) -> None:
        """Join ``binding``'s runtime, or (used on its own) make a runtime of its own."""
        own = binding is None
        if binding is None:
            binding = Binding.create(root, **standalone)
        self.__dict__["_vramfx_binding"] = binding
        self.__dict__["_vramfx_unit"] = binding.unit(root, name, recursive=recursive)
        self.__dict__["name"] = name
        self.__dict__["state"] = 0
        binding.wrappers.append(self)
        join_lora_fusion()
        honour_load_state_dict(self, self._vramfx_unit, binding.runtime)  # type: ignore[arg-type]
        if own:
            bound_calls(self, binding.runtime)  # type: ignore[arg-type]


def _vram_config(values: tuple[Any, ...]) -> dict[str, Any]:
    """The ``vram_config`` dict of a wrapper's 8 positional state arguments (None: omitted)."""
    return {key: value for key, value in zip(KEYS, values) if value is not None}


class AutoWrappedModule(SwapSwitches, torch.nn.Module):
    """Any module whose parameters (its submodules' included) are moved in around each forward.

    The wrapped module is ``self.module``, so state-dict names gain ``.module``; weights are
    still found in ``disk_map`` under the model's original names. Attributes the wrapper does not
    have are read from the wrapped module (``wrapper.patch_size``), as pipelines expect.

    Parameters
    ----------
    module:
        The module to wrap.
    offload_dtype, offload_device, onload_dtype, onload_device, preparing_dtype, preparing_device, computation_dtype, computation_device:
        The 8 ``vram_config`` keys, in the original's order (None: omitted).
    vram_limit:
        Used only when the wrapper is built on its own (``enable_vram_management`` shares one
        limit across the model).
    name:
        Its qualified name in the model: the prefix of its weights in ``disk_map``.
    disk_map:
        Where ``"disk"`` weights are read from (a :class:`vramfx.DiskMap`).

    Examples
    --------
    >>> norm = AutoWrappedModule(torch.nn.LayerNorm(4), computation_device="cpu")
    >>> norm(torch.ones(2, 4)).shape, norm.normalized_shape
    (torch.Size([2, 4]), (4,))
    """

    _recursive = True

    def __init__(
        self,
        module: torch.nn.Module,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: int | float | str | None = None,
        name: str = "",
        disk_map: Any = None,
        *,
        binding: Binding | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        config = _vram_config((offload_dtype, offload_device, onload_dtype, onload_device, preparing_dtype,
                               preparing_device, computation_dtype, computation_device))
        self._vramfx_bind(module, name, binding, recursive=self._recursive, vram_config=config,
                          vram_limit=vram_limit, disk_map=disk_map)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        unit = self._vramfx_unit
        return self._vramfx_binding.runtime.run(unit, lambda tensors: unit.call_with(tensors, self.module, args, kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module" or name.startswith("__"):
                raise
            return getattr(self.module, name)


class AutoWrappedNonRecurseModule(AutoWrappedModule):
    """A module whose own parameters are moved in around its forward; its submodules are matched
    against the map like any other (a block holding a modulation table, whose layers are wrapped
    one by one). The block's weights are in use while its forward runs, its layers' as each runs.

    Examples
    --------
    >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> block.register_parameter("scale", torch.nn.Parameter(torch.ones(4)))
    >>> wrapped = AutoWrappedNonRecurseModule(block, computation_device="cpu")
    >>> [slot.name for slot in wrapped._vramfx_unit.slots]  # its own parameter, not its Linear's
    ['scale']
    """

    _recursive = False


class AutoWrappedLinear(SwapSwitches, torch.nn.Linear):
    """An ``nn.Linear`` (still one, for ``isinstance``) whose weight and bias are moved in per call.

    Parameters are as for :class:`AutoWrappedModule`; ``module`` must be an ``nn.Linear``.
    State-dict names are the Linear's own.

    - **LoRA hot-load.** ``lora_A_weights`` / ``lora_B_weights`` are lists of adapter matrices
      (``A``: rank x in, ``B``: out x rank), applied after the linear as the original does:
      ``out + x @ A.T @ B.T`` for each pair in order, each cast to ``x``'s device and dtype; with a
      ``lora_merger`` module, ``lora_merger(out, stacked outputs)`` instead. The adapters are the
      caller's tensors, used where they are and not counted in ``vram_limit``; changing the lists
      takes effect on the next call.
    - **fp8 compute.** With an fp8 ``computation_dtype``, the weight is held in fp8 and the matmul
      runs in fp8 (``torch._scaled_mm``): the input is scaled per row to the fp8 range (never up),
      cast to fp8, and the output comes back in the input's dtype; the bias, held in fp8, is added
      in bfloat16.

    Examples
    --------
    >>> layer = AutoWrappedLinear(torch.nn.Linear(4, 2), computation_device="cpu", vram_limit=0)
    >>> layer(torch.ones(1, 4)).shape
    torch.Size([1, 2])
    """

    def __init__(
        self,
        module: torch.nn.Linear,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: int | float | str | None = None,
        name: str = "",
        disk_map: Any = None,
        *,
        binding: Binding | None = None,
    ) -> None:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"AutoWrappedLinear wraps an nn.Linear; got {type(module).__name__} (use AutoWrappedModule)")
        super().__init__(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=module.weight.dtype
        )
        self.weight = module.weight
        if module.bias is not None:
            self.bias = module.bias
        self.lora_A_weights: list[torch.Tensor] = []
        self.lora_B_weights: list[torch.Tensor] = []
        self.lora_merger: Any = None
        config = _vram_config((offload_dtype, offload_device, onload_dtype, onload_device, preparing_dtype,
                               preparing_device, computation_dtype, computation_device))
        self._vramfx_bind(self, name, binding, vram_config=config, vram_limit=vram_limit, disk_map=disk_map)
        join_lora_hot_load(AutoWrappedLinear)

    @property
    def enable_fp8(self) -> bool:
        """Whether the matmul runs in fp8 (an fp8 computation dtype)."""
        return self._vramfx_binding.config.computation.dtype in FP8_DTYPES

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``linear(x)`` plus the hot-loaded adapters; further arguments are ignored, as the original does."""
        linear = fp8_linear if self.enable_fp8 else F.linear
        out = self._vramfx_binding.runtime.run(self._vramfx_unit, lambda tensors: linear(x, *tensors))
        return lora_forward(self, x, out) if self.lora_A_weights else out
