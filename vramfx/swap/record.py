"""The module-order recorder, and the Liveness the planner reads from a recorded call.

Positions are unit calls in execution order. A unit's weights are in use from its call to its
return, so a unit whose forward calls other units (a block owning a parameter of its own) spans
their positions too. Every interval is half-open, ``[begin, end)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vramfx.plan.types import Liveness, WeightLife
from vramfx.swap.units import Unit
from vramfx.util import dtype_name


@dataclass
class CallRecord:
    """The units one call used: ``order[p]`` is the unit at position ``p``; it returned when
    ``ends[p]`` positions had begun. ``seconds[p]`` is its own compute time (without the units
    it called or the weights it waited for), when timed."""

    order: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    activation_peak_bytes: int = 0


class Recorder:
    """Records one call's unit order; optionally its compute times and memory.

    Parameters
    ----------
    timed:
        Measure each unit's own compute seconds (the first call streams synchronously, so its
        times are clean of overlapping copies).
    memory:
        Reads the device's memory in use (RssAnon on CPU); the activation peak is what it grew
        by beyond the weights the runtime holds, sampled at every unit's entry and exit.
    """

    def __init__(self, *, timed: bool = False, memory: Callable[[], int] | None = None) -> None:
        self.record = CallRecord()
        self._timed = timed
        self._memory = memory
        self._baseline = memory() if memory is not None else 0
        self._open: list[list[float]] = []  # per unit in progress: [start, seconds of its callees]

    def enter(self, unit_index: int, held_bytes: int, wait_seconds: float = 0.0) -> int:
        """A unit's forward starts (its weights are ready); returns its position."""
        record = self.record
        position = len(record.order)
        record.order.append(unit_index)
        record.ends.append(position + 1)
        record.seconds.append(0.0)
        if self._timed:
            if self._open:  # the caller's clock ran while this unit's weights were read
                self._open[-1][1] += wait_seconds
            self._open.append([time.perf_counter(), 0.0])
        self._sample(held_bytes)
        return position

    def exit(self, position: int, held_bytes: int) -> None:
        """The unit at ``position`` returned."""
        record = self.record
        record.ends[position] = len(record.order)
        self._sample(held_bytes)
        if self._timed and self._open:
            start, callees = self._open.pop()
            inclusive = time.perf_counter() - start
            record.seconds[position] = max(0.0, inclusive - callees)
            if self._open:
                self._open[-1][1] += inclusive

    def _sample(self, held_bytes: int) -> None:
        if self._memory is not None:
            grown = self._memory() - self._baseline - held_bytes
            self.record.activation_peak_bytes = max(self.record.activation_peak_bytes, grown)


def unit_seconds(record: CallRecord) -> dict[int, float]:
    """Each unit's mean compute seconds per call of it, from a timed record."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for unit, seconds in zip(record.order, record.seconds):
        total[unit] = total.get(unit, 0.0) + seconds
        count[unit] = count.get(unit, 0) + 1
    return {u: total[u] / count[u] for u in total}


def to_liveness(
    order: Sequence[int],
    ends: Sequence[int],
    units: Sequence[Unit],
    *,
    seconds: Mapping[int, float],
    alignment: int,
    activation_peak_bytes: int,
    flops_per_s: float,
) -> Liveness:
    """The planner's view of a recorded call: one weight per unit that copies or casts anything.

    A unit's bytes are the larger of its streamed and its kept size (both in aligned slots, in
    the dtypes they are held in). A unit that computes in another dtype than it is held in gets
    a compute dtype and the bytes of its casts, so the plan gives each span of its use a static
    slot in the upcast region. Activations are the measured peak at every position. A unit's
    compute seconds become FLOPs at ``flops_per_s``, so the cost model gives back the measured
    time.
    """
    n = len(order)
    uses: dict[int, list[int]] = {}
    spans: dict[int, list[list[int]]] = {}
    for position, (unit, end) in enumerate(zip(order, ends)):
        uses.setdefault(unit, []).append(position)
        end = max(end, position + 1)
        merged = spans.setdefault(unit, [])
        if merged and position < merged[-1][1]:  # a unit called from within itself
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([position, end])
    known = list(seconds.values())
    default_seconds = sum(known) / len(known) if known else 0.0
    weights = []
    for unit_index in sorted(uses, key=lambda u: uses[u][0]):
        unit = units[unit_index]
        nbytes = max(unit.stream_bytes(alignment), unit.prepared_bytes(alignment))
        cast_bytes = unit.cast_bytes(alignment)
        if nbytes == 0 and cast_bytes == 0:
            continue
        cast = unit.cast_slots()
        weights.append(
            WeightLife(
                name=unit.name,
                nbytes=nbytes,
                uses=tuple(uses[unit_index]),
                spans=tuple((b, e) for b, e in spans[unit_index]),
                dtype=dtype_name(unit.held_dtype(cast[0]) if cast else unit.slots[0].dtype),
                compute_dtype=dtype_name(unit.compute_dtypes[cast[0]]) if cast else None,
                compute_nbytes=cast_bytes,
            )
        )
    activation = (activation_peak_bytes,) * n
    flops = tuple(seconds.get(u, default_seconds) * flops_per_s for u in order)
    return Liveness(
        num_positions=n,
        weights=tuple(weights),
        activation_bytes=activation,
        flops=flops,
        memory_bytes=(0,) * n,
        workspace_bytes=max((units[u].staging_bytes() for u in set(order)), default=0),
        position_names=tuple(units[u].name for u in order),
    )
