"""The module-level path ``vramfx.compile`` falls back to, and runs ``generate`` through.

When ``torch.export`` cannot capture a model for an input signature (data-dependent control flow,
an unsupported op, a ``StaticCache``), the model still runs under its budget: eagerly, with every
module that holds parameters served by the layer-swap runtime, as if wrapped. Nothing in the
model's structure changes; each module's ``forward`` is patched on the instance for the call
and restored after it.

Generation goes the same way: ``generate`` calls the model once per token with a growing KV
cache, a new shape every step, and capturing each step would cost far more than the step. On
this path nothing is captured: the first call (the prompt) streams every module synchronously
and records their order; every later step fetches modules ahead along that order.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from vramfx.errors import BudgetError
from vramfx.precision import Precision, kept_names
from vramfx.runtime.engine import layout
from vramfx.storage.converted import ConvertedSource, serve_converted
from vramfx.swap.config import Placement
from vramfx.swap.patch import bound_calls, swapped_forward
from vramfx.swap.runtime import SwapRuntime, SwapStats, bind
from vramfx.swap.units import Slot, Unit, UnitBuilder, loose_tensors, materialise, rest_dtype
from vramfx.util import ALIGNMENT, format_bytes

log = logging.getLogger(__name__)


class ModulePath:
    """``model`` run module by module under ``budget_bytes``, weights read from ``source``.

    Every module that holds parameters is a unit; its parameters are moved in for its forward.
    Buffers are put on the device once (some models write them during forward). The budget
    covers the margin, those buffers, the activations measured on the first call, and the
    weights the runtime holds (kept modules, the streaming arena, the upcast region).

    With a ``precision`` (compile's ``storage_dtype`` / ``compute_dtype``), weights are stored
    and computed as compiled graphs do: each floating-point parameter outside the keep list is
    stored in the storage dtype, the others in the compute dtype — read as the source holds
    them when that converts into it exactly, else converted once into host memory — and held
    so on the device, kept or streamed; each call casts them up there. Floating-point buffers
    are used in the compute dtype. The model itself is left as it was between calls: its
    parameters and buffers are swapped in for each call and back after it.

    Parameters
    ----------
    model:
        The model; meta parameters are read from ``source``, real ones used from where they are.
    source:
        A WeightSource (DiskMap, host mapping), or None.
    device:
        The compute device.
    budget_bytes, margin_bytes, calls, bypass_page_cache:
        As for :func:`vramfx.compile`.
    precision:
        Storage and compute dtypes and the keep list, as :func:`vramfx.compile` checked them.

    Raises
    ------
    WeightsError
        Meta parameters or buffers missing from ``source``, or of another shape.
    BudgetError
        The budget cannot hold the margin, the buffers and the largest module's weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        source: Any,
        *,
        device: torch.device,
        budget_bytes: int,
        margin_bytes: int,
        calls: int,
        bypass_page_cache: bool = False,
        precision: Precision | None = None,
    ) -> None:
        self.model = model
        builder = UnitBuilder(model, source)
        owners = [
            (name, module)
            for name, module in model.named_modules()
            if any(p is not None for p in module._parameters.values())
        ]
        slots = [builder.slots(module, name, recursive=False, required=False) for name, module in owners]
        loose = loose_tensors(model, builder, {id(module) for _, module in owners})
        builder.raise_problems(type(model).__name__)
        # What the model holds now: put back after every call.
        self._places = [(module._parameters, local) for unit_slots in slots for s in unit_slots for module, local in s.places]
        self._places += [(t.store, t.local) for t in loose]
        self._originals = [store[local] for store, local in self._places]

        dtypes = _Dtypes(model, precision)
        units = [dtypes.unit(name or type(module).__name__, unit_slots, device) for (name, module), unit_slots in zip(owners, slots)]
        dtypes.convert_now()
        largest = max((layout(bind(u), ALIGNMENT.get(device.type, 64))[2] for u in units), default=0)
        buffers = Placement(device, dtypes.compute_dtype)
        moving = sum(_moved_bytes(t.store[t.local], buffers) for t in loose)
        minimum = margin_bytes + moving + largest
        if budget_bytes < minimum:
            self._put_back()
            raise BudgetError(
                f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the minimum of "
                f"{format_bytes(minimum, round_up=True)} for running {type(model).__name__} module by "
                f"module (margin {format_bytes(margin_bytes)}, buffers {format_bytes(moving)}, largest "
                f"module {format_bytes(largest)}, activations not counted yet); pass budget >= "
                f"{format_bytes(minimum, round_up=True)} (budget_bytes >= {minimum})",
                minimum_bytes=minimum,
            )
        materialise(loose, device, buffers, buffer_dtype=dtypes.compute_dtype)
        self._ours = [store[local] for store, local in self._places]
        self._put_back()
        self.runtime = SwapRuntime(
            device,
            limit_bytes=budget_bytes,
            calls=calls,
            reserved_bytes=margin_bytes + moving,
            activations_in_limit=True,
            bypass_page_cache=bypass_page_cache,
        )
        self._modules = [(module, self.runtime.add(unit)) for (_, module), unit in zip(owners, units)]

    @property
    def stats(self) -> SwapStats:
        return self.runtime.stats()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._installed(), torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``generate``, each step on this path (see the module docstring)."""
        with self._installed(), torch.no_grad(), warnings.catch_warnings():
            # The model's parameters are meta between calls, so transformers reads its device
            # as meta and warns that CUDA inputs are elsewhere; they are where compute runs.
            warnings.filterwarnings("ignore", message=r"You are calling \.generate\(\) with the `input_ids` being on a device")
            return self.model.generate(*args, **kwargs)

    def release(self) -> None:
        """Free what the path holds on the device; the next call loads it again."""
        self.runtime.release()

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The model holds this path's parameters and buffers, every unit's module swaps its
        weights in, and the model marks its calls, for this block."""
        for (store, local), ours in zip(self._places, self._ours):
            store[local] = ours
        undo = [swapped_forward(module, unit, self.runtime) for module, unit in self._modules]
        undo.append(bound_calls(self.model, self.runtime))
        try:
            yield
        finally:
            for step in reversed(undo):
                step()
            # A buffer the forward replaced is the one the next call reads.
            self._ours = [store[local] for store, local in self._places]
            self._put_back()

    def _put_back(self) -> None:
        """Give the model back the parameters and buffers it held before this path was made."""
        for (store, local), original in zip(self._places, self._originals):
            store[local] = original


class _Dtypes:
    """The dtypes compile's precision gives each parameter of a unit (none: the model's own)."""

    def __init__(self, model: torch.nn.Module, precision: Precision | None) -> None:
        self.precision = precision
        self.compute_dtype = precision.compute_dtype if precision is not None else None
        low = precision is not None and precision.storage_dtype is not None
        self._kept = kept_names(model, precision.keep) if low else set()  # type: ignore[union-attr]
        self._converted: dict[int, ConvertedSource] = {}

    def unit(self, name: str, slots: tuple[Slot, ...], device: torch.device) -> Unit:
        """A unit of ``slots`` whose values rest in their storage dtypes, converted once."""
        slots = tuple(self._stored_in(s, self._storage(s)) for s in slots)
        unit = Unit(name, slots, device=device, compute_dtypes=tuple(self._compute(s.dtype) for s in slots))
        for i, home in enumerate(unit.home):
            if home is not None and home.dtype != rest_dtype(home.dtype, self._storage(slots[i])):
                unit.set_home(i, home.detach().to(rest_dtype(home.dtype, self._storage(slots[i]))))
        return unit

    def convert_now(self) -> None:
        """Convert what the units read in another dtype than stored, before the first call measures
        the activations (the converted copies rest in host memory)."""
        for source in self._converted.values():
            source.convert_all()

    def _compute(self, dtype: torch.dtype) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None and dtype.is_floating_point else dtype

    def _storage(self, slot: Slot) -> torch.dtype | None:
        """The dtype ``slot`` is stored in, as compile's policy says; None: as its source holds it."""
        precision = self.precision
        if precision is None:
            return None
        low = precision.storage_dtype is not None and slot.dtype.is_floating_point and slot.name not in self._kept
        return precision.storage_dtype if low else self._compute(slot.dtype)

    def _stored_in(self, slot: Slot, wanted: torch.dtype | None) -> Slot:
        """``slot`` read from a source that serves it in its storage dtype, converting it once."""
        ref = slot.ref
        if ref is None or rest_dtype(ref.dtype, wanted) == ref.dtype:
            return slot
        dtype = rest_dtype(ref.dtype, wanted)
        source = serve_converted(self._converted, ref.source, ref.key, dtype)
        return replace(slot, ref=replace(ref, source=source, dtype=dtype, nbytes=source.info(ref.key).nbytes))


def _moved_bytes(tensor: torch.Tensor, placement: Placement) -> int:
    """Bytes ``tensor`` takes once put in ``placement`` (0 when it is there already)."""
    dtype = placement.dtype_for(tensor.dtype)
    if not tensor.is_meta and tensor.device == placement.device and tensor.dtype == dtype:
        return 0
    return tensor.numel() * dtype.itemsize
