"""The ``table`` format: a plan's summary, then its schedule one layer per line, for humans."""

from __future__ import annotations

from collections.abc import Sequence

from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness
from vramfx.report.layers import Block, schedule_blocks, weight_layers
from vramfx.report.timeline import Timeline, predict_timeline
from vramfx.util import format_bytes, format_seconds

#: Layers named in one fetch or drop cell before the rest are counted.
_NAMED_LAYERS = 2
_LAYER_WIDTH = 32


def format_table(
    plan: Plan,
    liveness: Liveness,
    labels: Sequence[str],
    *,
    settings: Sequence[tuple[str, str]] = (),
) -> str:
    """A plan for a terminal: settings, summary, largest transfers, and the schedule by layer.

    Parameters
    ----------
    plan:
        The plan to show.
    liveness:
        The liveness it was made from (per-node costs and first uses).
    labels:
        The layer of each position (:func:`vramfx.report.layers.layer_labels`).
    settings:
        ``(name, value)`` lines printed first: what the plan was made with.

    Returns
    -------
    str
        Lines of at most about 110 characters, no trailing newline.

    Examples
    --------
    >>> print(format_table(plan, liveness, labels))  # doctest: +SKIP
    """
    timeline = predict_timeline(plan, liveness)
    blocks = schedule_blocks(plan, labels)
    lines = []
    if settings:
        width = max(len(name) for name, _ in settings)
        lines += [f"{name:<{width}}  {value}" for name, value in settings]
        lines.append("")
    lines.append(plan.summary())
    lines.append("")
    lines += _schedule_lines(plan, liveness, blocks, timeline)
    return "\n".join(lines)


def _schedule_lines(plan: Plan, liveness: Liveness, blocks: Sequence[Block], timeline: Timeline) -> list[str]:
    """One line per block: positions, predicted compute and stall, resident bytes, steps."""
    layer = weight_layers([w.name for w in plan.weights])
    resident = set(plan.resident)
    resident_at = [0] * (plan.num_positions + 1)
    for w in liveness.weights:
        if w.name in resident:
            resident_at[w.first_use] += w.nbytes
    header = ("layer", "positions", "compute", "stall", "resident", "fetch", "wait", "drop")
    casts_at = [0] * (plan.num_positions + 1)
    for c in plan.casts:
        casts_at[c.position] += 1
    rows = []
    for block in blocks:
        span = range(block.begin, block.end)
        rows.append((
            block.layer if len(block.layer) <= _LAYER_WIDTH else "…" + block.layer[-_LAYER_WIDTH + 1 :],
            _positions(block.begin, block.end),
            format_seconds(sum(timeline.node_seconds[t] for t in span)),
            _seconds_or_dash(sum(timeline.stall_seconds[t] for t in span)),
            _bytes_or_dash(sum(resident_at[t] for t in span)),
            _steps_cell(plan, block.fetch, layer, name_layers=True),
            str(len(block.wait)) if block.wait else "-",
            _steps_cell(plan, block.drop, layer, name_layers=False),
            str(sum(casts_at[t] for t in span) or "-"),
        ))
    every = range(plan.num_positions)
    all_transfers = tuple(range(len(plan.transfers)))
    rows.append((
        "total",
        _positions(0, plan.num_positions),
        format_seconds(sum(timeline.node_seconds)),
        _seconds_or_dash(sum(timeline.stall_seconds[t] for t in every)),
        _bytes_or_dash(plan.resident_bytes),
        _steps_cell(plan, all_transfers, layer, name_layers=False),
        str(len(all_transfers)) if all_transfers else "-",
        _steps_cell(plan, all_transfers, layer, name_layers=False),
        str(len(plan.casts) or "-"),
    ))
    if plan.casts:  # weights stored in a low dtype: the cast steps get a column
        header += ("cast",)
    else:
        rows = [r[:-1] for r in rows]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    right = {1, 2, 3, 4, 6, 8}

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths))]
        return "  " + "  ".join(out).rstrip()

    lines = [
        f"schedule, one line per layer ({len(blocks)}): predicted compute and stall, weights first "
        "used there and kept resident,",
        "and the fetches (with the layers they bring), waits and drops issued while it runs"
        + (", and the casts of weights stored low" if plan.casts else ""),
        line(header),
        *(line(r) for r in rows[:-1]),
        line(["-" * w for w in widths]),
        line(rows[-1]),
    ]
    if timeline.interference_seconds > 0:
        lines.append(
            f"  and {format_seconds(timeline.interference_seconds)} of copy interference per call: compute "
            f"lost to copies running beside it ({plan.cost_model.get('copy_interference', 0):g} × copy time)"
        )
    return lines


def _steps_cell(plan: Plan, transfers: Sequence[int], layer: dict[str, str], *, name_layers: bool) -> str:
    """``270.0 MiB in 3 → blocks.5`` for a block's fetches or drops (the layers only for fetches)."""
    if not transfers:
        return "-"
    nbytes = sum(plan.transfers[i].nbytes for i in transfers)
    cell = format_bytes(nbytes) + (f" in {len(transfers)}" if len(transfers) > 1 else "")
    if name_layers:
        layers = list(dict.fromkeys(layer[n] for i in transfers for n in plan.transfers[i].names))
        named = ", ".join(layers[:_NAMED_LAYERS])
        more = f" +{len(layers) - _NAMED_LAYERS}" if len(layers) > _NAMED_LAYERS else ""
        cell += f" → {named}{more}"
    return cell


def _positions(begin: int, end: int) -> str:
    """``[begin, end)`` for people: ``12-40``, ``7``, or ``-`` when empty."""
    if end <= begin:
        return "-"
    return str(begin) if end == begin + 1 else f"{begin}-{end - 1}"


def _seconds_or_dash(seconds: float) -> str:
    return format_seconds(seconds) if seconds > 0 else "-"


def _bytes_or_dash(nbytes: int) -> str:
    return format_bytes(nbytes) if nbytes else "-"
