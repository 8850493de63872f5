"""The ``png`` format: device memory over one predicted call, stacked, against the budget.

matplotlib is an optional extra (``pip install 'vramfx[plot]'``); :func:`require_matplotlib`
says so before any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness
from vramfx.report.layers import schedule_blocks
from vramfx.report.timeline import memory_profile, predict_timeline
from vramfx.util import format_bytes, format_seconds

INSTALL_HINT = "pip install 'vramfx[plot]' (or pip install matplotlib)"
#: At most this many layer starts are labelled on the time axis, so labels do not overlap.
_MAX_LAYER_TICKS = 30


def _unit(nbytes: int) -> tuple[str, int]:
    """The binary unit that shows ``nbytes`` as a number between 2 and 2048."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= 2 * scale:
            return unit, scale
    return "B", 1


class MissingMatplotlib(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingMatplotlib(f"the png format needs matplotlib, which is not installed: {INSTALL_HINT}") from exc


def plot_memory(
    plan: Plan,
    liveness: Liveness,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "vramfx plan",
) -> None:
    """Write a PNG of device memory over one predicted call of ``plan``.

    The areas are stacked: workspace with the margin, resident weights, streamed weights in the
    arena (fetched, in flight or in use, not yet dropped), the rest of the arena (allocated
    whole), and activations. The budget is a line above them.

    Parameters
    ----------
    plan, liveness:
        The plan and the liveness it was made from.
    labels:
        The layer of each position; some layer starts are marked on the time axis.
    path:
        Where to write the PNG.
    title:
        The plot's title.

    Raises
    ------
    MissingMatplotlib
        If matplotlib is not installed.

    Examples
    --------
    >>> plot_memory(plan, liveness, labels, "memory.png")  # doctest: +SKIP
    """
    require_matplotlib()
    # A bare Figure, not pyplot: no backend is chosen and no global figure state is touched.
    from matplotlib.figure import Figure

    timeline = predict_timeline(plan, liveness)
    memory = memory_profile(plan, liveness)
    n = plan.num_positions
    # Each position holds its memory from its node's start (its stall included) to the next's.
    starts = [timeline.node_start[t] - timeline.stall_seconds[t] for t in range(n)]
    time_unit, time_scale = ("s", 1.0) if timeline.compute_end >= 2.0 else ("ms", 1e3)
    x = [s * time_scale for s in starts] + [timeline.compute_end * time_scale]
    unit, scale = _unit(max(plan.budget_bytes, plan.peak_bytes))
    # Constant parts at the bottom, so what changes over the call shows on top.
    layers = [
        ("workspace + margin", [memory.workspace / scale] * n, "#8c8c8c"),
        ("resident weights", [memory.resident / scale] * n, "#4c72b0"),
        ("streamed weights (fetched, not yet dropped)", [b / scale for b in memory.streamed], "#dd8452"),
        ("arena, free", [(memory.arena - b) / scale for b in memory.streamed], "#f3d3b8"),
        *([("upcast region (casts)", [memory.upcast / scale] * n, "#8172b3")] if memory.upcast else []),
        ("activations", [a / scale for a in memory.activations], "#55a868"),
    ]
    fig = Figure(figsize=(11, 4.8), dpi=110)
    ax = fig.subplots()
    bottom = [0.0] * n
    for label, values, color in layers:
        top = [b + v for b, v in zip(bottom, values)]
        ax.fill_between(x, bottom + bottom[-1:], top + top[-1:], step="post", color=color, label=label, linewidth=0)
        bottom = top
    ax.axhline(plan.budget_bytes / scale, color="#c44e52", linewidth=1.5, label=f"budget {format_bytes(plan.budget_bytes)}")
    ax.axhline(plan.peak_bytes / scale, color="black", linewidth=0.8, linestyle="--",
               label=f"planned peak {format_bytes(plan.peak_bytes)}")
    blocks = [b for b in schedule_blocks(plan, labels) if b.end > b.begin]
    marked = []
    for block in blocks:  # labels closer than 1/_MAX_LAYER_TICKS of the axis would overlap
        if not marked or x[block.begin] - x[marked[-1].begin] >= x[-1] / _MAX_LAYER_TICKS:
            marked.append(block)
    secondary = ax.secondary_xaxis("top")
    secondary.set_xticks([x[b.begin] for b in marked], [b.layer for b in marked], rotation=60, fontsize=6, ha="left")
    ax.set_xlim(0, max(x[-1], 1e-9))
    ax.set_ylim(0, max(plan.budget_bytes, plan.peak_bytes) / scale * 1.08)
    ax.set_xlabel(f"predicted time in one call ({time_unit})")
    ax.set_ylabel(f"device memory ({unit})")
    p = plan.predicted
    ax.set_title(
        f"{title}: {format_seconds(p.seconds_per_call)} per call, stall {format_seconds(p.stall_seconds)}, "
        f"{format_bytes(plan.streamed_bytes)} streamed per call",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, format="png")
