"""Which earlier transfers a fetch must wait out before its copy may write its arena slots.

The CUDA engine copies on its own stream while the graph computes on another, so a copy into
reused arena bytes must wait until the compute stream has passed the ``drop`` of whoever held
those bytes before. Only the most recent previous holder of each byte matters: its drop comes
after every earlier holder's drop on the in-order compute stream. Calls repeat the same plan,
so at the start of a call the holders are those the previous call left.

Pure data over a Plan: no device is involved.
"""

from __future__ import annotations

from bisect import bisect_right

from vramfx.plan.plan import Plan, Transfer
from vramfx.util import align_up


def reserved_ranges(transfer: Transfer, alignment: int, arena_bytes: int) -> list[tuple[int, int]]:
    """The arena bytes ``transfer`` may write, padding included, as sorted half-open ranges
    (touching ones merged: a transfer's members usually form one block)."""
    ranges: list[tuple[int, int]] = []
    for offset, size in sorted(zip(transfer.offsets, transfer.sizes)):
        if not size:
            continue
        end = min(align_up(offset + size, alignment), arena_bytes)
        if ranges and ranges[-1][1] >= offset:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((offset, end))
    return ranges


def fetch_order(plan: Plan) -> list[int]:
    """Transfer ids in the order the rewritten graph fetches them."""
    return [step.transfer for step in plan.steps if step.op == "fetch"]


def reuse_predecessors(plan: Plan) -> dict[int, tuple[int, ...]]:
    """For each transfer, the transfers whose drop its copy must follow (itself included, from
    the previous call, when nothing else used its bytes in between).

    Parameters
    ----------
    plan:
        A checked plan: transfers live at the same time never share arena bytes.

    Returns
    -------
    dict[int, tuple[int, ...]]
        Transfer id to the ids of the last previous holders of any of its bytes, sorted.

    Examples
    --------
    Two transfers taking turns in one slot wait for each other; on the first call nothing has
    been dropped yet, so the engine skips waits it has no event for.

    >>> reuse_predecessors(plan)  # doctest: +SKIP
    {0: (1,), 1: (0,)}
    """
    order = fetch_order(plan)
    by_id = {t.id: t for t in plan.transfers}
    painter = _Painter()
    for tid in order:  # one call leaves the holders the next call starts from
        for start, end in reserved_ranges(by_id[tid], plan.alignment, plan.arena_bytes):
            painter.paint(start, end, tid)
    result = {}
    for tid in order:
        found: set[int] = set()
        for start, end in reserved_ranges(by_id[tid], plan.alignment, plan.arena_bytes):
            found.update(painter.paint(start, end, tid))
        result[tid] = tuple(sorted(found))
    return result


class _Painter:
    """Disjoint, sorted byte ranges, each labelled with the transfer that wrote it last."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.spans: list[tuple[int, int, int]] = []  # (start, end, owner), sorted by start

    def paint(self, start: int, end: int, owner: int) -> set[int]:
        """Label ``[start, end)`` with ``owner``; the previous owners of any of it."""
        k = max(bisect_right(self.starts, start) - 1, 0)
        previous: set[int] = set()
        keep_before: list[tuple[int, int, int]] = []
        keep_after: list[tuple[int, int, int]] = []
        stop = k
        while stop < len(self.spans) and self.spans[stop][0] < end:
            s, e, o = self.spans[stop]
            if e > start:
                previous.add(o)
                if s < start:
                    keep_before.append((s, start, o))
                if e > end:
                    keep_after.append((end, e, o))
            else:
                keep_before.append((s, e, o))
            stop += 1
        self.spans[k:stop] = [*keep_before, (start, end, owner), *keep_after]
        self.starts = [s for s, _, _ in self.spans]
        return previous
