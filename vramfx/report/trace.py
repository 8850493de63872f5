"""The ``chrome`` format: a plan's predicted call as a Chrome trace, for Perfetto or chrome://tracing.

Tracks: *compute* (one slice per layer, the graph's nodes nested under it, stalls where compute
waits for a copy, and the copy interference at the end), *copy engine* (one slice per fetch),
and counters of device memory in use, stacked, against the budget. Times are the cost model's
predictions, not measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness
from vramfx.report.layers import schedule_blocks
from vramfx.report.timeline import MemoryProfile, Timeline, memory_profile, predict_timeline

_PID = 1
_COMPUTE, _COPY = 1, 2
_MIB = 2**20
#: Members named in a fetch slice's arguments before the rest are counted.
_NAMED_MEMBERS = 8


def chrome_trace(plan: Plan, liveness: Liveness, labels: Sequence[str], *, title: str = "vramfx plan") -> dict[str, Any]:
    """The predicted call of ``plan`` in the Chrome trace event format (``traceEvents``).

    Parameters
    ----------
    plan:
        The plan to draw.
    liveness:
        The liveness it was made from (per-node costs and activation bytes).
    labels:
        The layer of each position (:func:`vramfx.report.layers.layer_labels`).
    title:
        The process name the viewer shows.

    Returns
    -------
    dict
        ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``, ready for
        ``json.dump``. Timestamps are microseconds from the start of the call.

    Examples
    --------
    >>> json.dump(chrome_trace(plan, liveness, labels), open("plan.trace.json", "w"))  # doctest: +SKIP
    """
    timeline = predict_timeline(plan, liveness)
    memory = memory_profile(plan, liveness)
    names = plan.position_names or tuple(f"node {t}" for t in range(plan.num_positions))
    us = 1e6
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": title}),
        _meta("thread_name", _COMPUTE, {"name": "compute"}),
        _meta("thread_name", _COPY, {"name": "copy engine"}),
        _meta("thread_sort_index", _COMPUTE, {"sort_index": 0}),
        _meta("thread_sort_index", _COPY, {"sort_index": 1}),
    ]
    for block in schedule_blocks(plan, labels):
        if block.end <= block.begin:
            continue
        start = timeline.node_start[block.begin]
        end = timeline.node_start[block.end - 1] + timeline.node_seconds[block.end - 1]
        events.append(_slice(block.layer, "layer", _COMPUTE, start * us, (end - start) * us,
                             {"positions": f"{block.begin}-{block.end - 1}"}))
    waited_at: dict[int, list[int]] = {}
    for tr in plan.transfers:
        waited_at.setdefault(tr.wait, []).append(tr.id)
    for t in range(plan.num_positions):
        if timeline.stall_seconds[t] > 0:
            stall_start = timeline.node_start[t] - timeline.stall_seconds[t]
            waited = waited_at.get(t, [])
            events.append(_slice("stall", "stall", _COMPUTE, stall_start * us, timeline.stall_seconds[t] * us,
                                 {"position": t, "waits for transfers": waited}))
        events.append(_slice(names[t], "node", _COMPUTE, timeline.node_start[t] * us, timeline.node_seconds[t] * us,
                             {"position": t, "layer": labels[t], "flops": liveness.flops[t],
                              "bytes": liveness.memory_bytes[t]}))
    if timeline.interference_seconds > 0:
        events.append(_slice("copy interference", "stall", _COMPUTE, timeline.compute_end * us,
                             timeline.interference_seconds * us,
                             {"why": "compute lost to copies running beside it, charged once per call"}))
    for i, tr in enumerate(plan.transfers):
        shown = list(tr.names[:_NAMED_MEMBERS])
        if len(tr.names) > _NAMED_MEMBERS:
            shown.append(f"+{len(tr.names) - _NAMED_MEMBERS} more")
        events.append(_slice(f"fetch #{tr.id}", "copy", _COPY, timeline.copy_start[i] * us, timeline.copy_seconds[i] * us,
                             {"bytes": tr.nbytes, "weights": shown, "fetch": tr.fetch, "wait": tr.wait,
                              "drop": tr.drop}))
    events += _memory_counters(plan, memory, timeline, us)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "vramfx plan: predicted by the cost model, not measured",
            "budget_bytes": plan.budget_bytes,
            "peak_bytes": plan.peak_bytes,
            "seconds_per_call": plan.predicted.seconds_per_call,
            "stall_seconds": plan.predicted.stall_seconds,
            "cost_model": dict(plan.cost_model),
        },
    }


def _memory_counters(plan: Plan, memory: MemoryProfile, timeline: Timeline, us: float) -> list[dict[str, Any]]:
    """Stacked device memory (MiB) at each position where it changes, and the budget."""
    events = []
    previous = None
    for t in range(plan.num_positions):
        values = {  # the order the viewer stacks them in, as the png does
            "workspace": memory.workspace / _MIB,
            "resident": memory.resident / _MIB,
            "streamed weights": memory.streamed[t] / _MIB,
            "arena free": (memory.arena - memory.streamed[t]) / _MIB,
            **({"upcast region": memory.upcast / _MIB} if memory.upcast else {}),
            "activations": memory.activations[t] / _MIB,
        }
        if values != previous:
            events.append(_counter("device memory (MiB)", timeline.node_start[t] * us, values))
            previous = values
    end = timeline.seconds * us
    events.append(_counter("budget (MiB)", 0.0, {"budget": plan.budget_bytes / _MIB}))
    events.append(_counter("budget (MiB)", end, {"budget": plan.budget_bytes / _MIB}))
    return events


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "name": name, "pid": _PID, "tid": tid, "args": args}


def _slice(name: str, category: str, tid: int, ts: float, dur: float, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "X", "name": name, "cat": category, "pid": _PID, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _counter(name: str, ts: float, values: dict[str, float]) -> dict[str, Any]:
    return {"ph": "C", "name": name, "pid": _PID, "ts": ts, "args": values}
