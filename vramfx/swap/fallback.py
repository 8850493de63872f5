"""The module-level path ``vramfx.compile`` falls back to, and runs ``generate`` through.

When ``torch.export`` cannot capture a model (data-dependent control flow, an unsupported op, a
cache object as input or output), the model still runs under its budget: eagerly, with every
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
from typing import Any

import torch

from vramfx.errors import BudgetError
from vramfx.plan.plan import format_bytes
from vramfx.swap.config import Placement
from vramfx.swap.patch import bound_calls, swapped_forward
from vramfx.swap.runtime import SwapRuntime, SwapStats
from vramfx.swap.units import Unit, UnitBuilder, loose_tensors, materialise

log = logging.getLogger(__name__)


class ModulePath:
    """``model`` run module by module under ``budget_bytes``, weights read from ``source``.

    Every module that holds parameters is a unit; its parameters are moved in for its forward.
    Buffers are put on the device once (some models write them during forward). The budget
    covers the margin, those buffers, the activations measured on the first call, and the
    weights the runtime holds (kept modules, the streaming arena).

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
        units = [
            Unit(
                name or type(module).__name__,
                unit_slots,
                device=device,
                compute_dtypes=tuple(s.dtype for s in unit_slots),
                prepared_dtypes=tuple(s.dtype for s in unit_slots),
            )
            for (name, module), unit_slots in zip(owners, slots)
        ]
        largest = max((u.stream_bytes() for u in units), default=0)
        buffers = sum(_nbytes(t.store[t.local]) for t in loose if not t.placed_on(device))
        minimum = margin_bytes + buffers + largest
        if budget_bytes < minimum:
            raise BudgetError(
                f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the minimum of "
                f"{format_bytes(minimum, round_up=True)} for running {type(model).__name__} module by "
                f"module (margin {format_bytes(margin_bytes)}, buffers {format_bytes(buffers)}, largest "
                f"module {format_bytes(largest)}, activations not counted yet); pass budget >= "
                f"{format_bytes(minimum, round_up=True)} (budget_bytes >= {minimum})",
                minimum_bytes=minimum,
            )
        moved = materialise(loose, device, Placement(device, None))
        self.runtime = SwapRuntime(
            device,
            limit_bytes=budget_bytes,
            calls=calls,
            reserved_bytes=margin_bytes + moved,
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
        """Every unit's module swaps its weights in, and the model marks its calls, for this block."""
        undo = [swapped_forward(module, unit, self.runtime) for module, unit in self._modules]
        undo.append(bound_calls(self.model, self.runtime))
        try:
            yield
        finally:
            for step in reversed(undo):
                step()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
