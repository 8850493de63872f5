"""The module-order recorder, and the Liveness the planner reads from a recorded call.

Positions are unit calls in execution order. A unit's weights are in use from its call to its
return, so a unit whose forward calls other units (a block owning a parameter of its own) spans
their positions too. Every interval is half-open, ``[begin, end)``.

Each position's cost is the FLOPs its unit ran itself (callees excluded), counted by torch's
FLOP formulas on the recorded call: the same model and inputs give the same plan on any machine,
however loaded, as compiled graphs' plans do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from vramfx.plan.types import Liveness, WeightLife
from vramfx.runtime.sources import on_device
from vramfx.storage.ref import WeightRef
from vramfx.util import dtype_name
from vramfx.weights import stored_formats


class FlopCount(TorchDispatchMode):
    """FLOPs of every op run while active, by torch's own formulas (matmuls, convolutions,
    attention); ops without one count nothing. No module hooks: model code runs as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            try:
                self.flops += float(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot read these shapes (grouped-query SDPA): uncounted
                pass
        return out


@dataclass
class CallRecord:
    """The units one call used: ``order[p]`` is the unit at position ``p``; it returned when
    ``ends[p]`` positions had begun. ``flops[p]`` is what it computed itself, when counted."""

    order: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    activation_peak_bytes: int = 0


class Recorder:
    """Records one call's unit order; optionally its FLOPs and memory.

    Parameters
    ----------
    count_flops:
        Count each unit's own FLOPs (the counter runs while a unit does, never between them, so a
        pass that no forward of the model marks leaves the caller's code alone).
    memory:
        Reads the device's memory in use (RssAnon on CPU); the activation peak is what it grew
        by beyond the weights the runtime holds, sampled at every unit's entry and exit.
    held_bytes:
        What the runtime holds when the call starts (``memory`` already counts it).
    """

    def __init__(
        self, *, count_flops: bool = False, memory: Callable[[], int] | None = None, held_bytes: int = 0
    ) -> None:
        self.record = CallRecord()
        self._memory = memory
        self._baseline = memory() - held_bytes if memory is not None else 0
        self._counter = FlopCount() if count_flops else None
        self._open: list[list[float]] = []  # per unit in progress: [FLOPs when it began, its callees']

    def stop(self) -> None:
        """The call is over: stop counting if a unit is still open (one raised past its exit)."""
        if self._open and self._counter is not None:
            self._counter.__exit__(None, None, None)
        self._open.clear()

    def enter(self, unit_index: int, held_bytes: int) -> int:
        """A unit's forward starts (its weights are ready); returns its position."""
        record = self.record
        position = len(record.order)
        record.order.append(unit_index)
        record.ends.append(position + 1)
        record.flops.append(0.0)
        if not self._open and self._counter is not None:
            self._counter.__enter__()  # counting runs inside units only: code between them is not theirs
        self._open.append([self._flops(), 0.0])
        self._sample(held_bytes)
        return position

    def exit(self, position: int, held_bytes: int) -> None:
        """The unit at ``position`` returned."""
        record = self.record
        record.ends[position] = len(record.order)
        self._sample(held_bytes)
        if self._open:
            began, callees = self._open.pop()
            inclusive = self._flops() - began
            record.flops[position] = max(0.0, inclusive - callees)
            if self._open:
                self._open[-1][1] += inclusive
            elif self._counter is not None:
                self._counter.__exit__(None, None, None)

    def _flops(self) -> float:
        return self._counter.flops if self._counter is not None else 0.0

    def _sample(self, held_bytes: int) -> None:
        if self._memory is not None:
            grown = self._memory() - self._baseline - held_bytes
            self.record.activation_peak_bytes = max(self.record.activation_peak_bytes, grown)


def flops_per_unit(record: CallRecord) -> dict[int, float]:
    """Each unit's mean FLOPs per call of it, from a counted record: a later order's positions
    cost what their units did when first counted."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for unit, flops in zip(record.order, record.flops):
        total[unit] = total.get(unit, 0.0) + flops
        count[unit] = count.get(unit, 0) + 1
    return {u: total[u] / count[u] for u in total}


def to_liveness(
    record: CallRecord,
    weights: Mapping[int, Sequence[WeightRef]],
    names: Sequence[str],
    *,
    activation_peak_bytes: int,
    workspace_bytes: int,
    device: torch.device,
) -> Liveness:
    """The planner's view of a recorded call: one weight per tensor a unit copies or casts.

    A tensor is in use over its unit's spans; one already on the device (a home kept there, in
    another dtype than it computes in) takes no bytes to keep, only its casts. A tensor held in another dtype than it computes in
    gets that compute dtype and its bytes in it, so the plan gives each span a static slot in the
    upcast region. Activations are the measured peak at every position; each position costs its
    unit's own FLOPs and the bytes of its weights.

    Parameters
    ----------
    record:
        The recorded call (order, ends, FLOPs).
    weights:
        Per unit index, the weights it copies to the device.
    names:
        Per unit index, its name.
    activation_peak_bytes, workspace_bytes:
        Measured activations (0 when the limit does not cover them), and the largest transient
        a read takes on the device.
    device:
        The compute device.
    """
    n = len(record.order)
    uses: dict[int, list[int]] = {}
    spans: dict[int, list[list[int]]] = {}
    for position, (unit, end) in enumerate(zip(record.order, record.ends)):
        uses.setdefault(unit, []).append(position)
        end = max(end, position + 1)
        merged = spans.setdefault(unit, [])
        if merged and position < merged[-1][1]:  # a unit called from within itself
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([position, end])
    lives = []
    decoded = stored_formats({r.name: r for rs in weights.values() for r in rs}, device)
    for unit in sorted(uses, key=lambda u: uses[u][0]):
        for ref in weights.get(unit, ()):
            cast = ref.casts
            lives.append(
                WeightLife(
                    name=ref.name,
                    nbytes=0 if on_device(ref, device) is not None else ref.nbytes,
                    uses=tuple(uses[unit]),
                    spans=tuple((b, e) for b, e in spans[unit]),
                    shape=tuple(ref.shape),
                    dtype=dtype_name(ref.dtype),
                    compute_dtype=dtype_name(ref.compute_dtype) if cast else None,
                    compute_nbytes=math.prod(ref.shape) * ref.compute_dtype.itemsize if cast else 0,  # type: ignore[union-attr]
                    format=decoded[ref.name].format if ref.name in decoded else None,
                )
            )
    flops = tuple(record.flops) if len(record.flops) == n else (0.0,) * n
    return Liveness(
        num_positions=n,
        weights=tuple(lives),
        activation_bytes=(activation_peak_bytes,) * n,
        flops=flops,
        memory_bytes=tuple(sum(r.nbytes for r in weights.get(u, ())) for u in record.order),
        workspace_bytes=max([workspace_bytes, *(d.workspace_bytes for d in decoded.values())]),
        position_names=tuple(names[u] for u in record.order),
    )
