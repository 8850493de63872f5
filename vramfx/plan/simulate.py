"""The two-resource model of one steady-state call: compute, and one copy engine taking transfers in order.

The scheduler scores every candidate plan with it, and the report replays a chosen plan with it
for traces and plots, so both see the same prediction. Pure arithmetic over plain sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CopyTimes:
    """When each transfer's copy runs, and what compute waits for it, in seconds from the call's start.

    ``stall[i]`` is compute waiting for transfer ``i`` right before the node at its ``wait``
    (several transfers waited for at one position share the wait: the first pays it).
    ``compute_end`` is when the last node ends, before any copy interference.
    """

    start: tuple[float, ...]
    arrive: tuple[float, ...]
    stall: tuple[float, ...]
    compute_end: float


def simulate_copies(
    fetch: Sequence[int],
    wait: Sequence[int],
    copy_seconds: Sequence[float],
    prefix: Sequence[float],
) -> CopyTimes:
    """Replay one call: compute runs the nodes in order, the copy engine the transfers in order.

    A fetch at position ``p`` is issued when compute reaches ``p`` (node ``p - 1`` finished); its
    copy starts once the engine is free. Node ``p`` starts after every transfer whose ``wait`` is
    ``p`` has arrived.

    Parameters
    ----------
    fetch, wait:
        Per transfer, in fetch order, its fetch and wait positions (``fetch <= wait``; waits in
        the same order as the transfers).
    copy_seconds:
        Per transfer, how long its copy takes.
    prefix:
        Cumulative node seconds: ``prefix[p]`` is the compute before node ``p``, with
        ``prefix[0] == 0`` and ``prefix[-1]`` the whole call's compute.

    Returns
    -------
    CopyTimes

    Examples
    --------
    >>> t = simulate_copies([0, 0], [1, 2], [2.0, 2.0], [0.0, 1.0, 2.0, 3.0])
    >>> t.start, t.arrive, t.stall, t.compute_end
    ((0.0, 2.0), (2.0, 4.0), (1.0, 1.0), 5.0)
    """
    n = len(fetch)
    start = [0.0] * n
    arrive = [0.0] * n
    stall = [0.0] * n
    now = engine_free = 0.0
    position = next_fetch = 0
    for i in range(n):
        # Fetches at a position run before the waits there.
        while next_fetch < n and fetch[next_fetch] <= wait[i]:
            p = fetch[next_fetch]
            now += prefix[p] - prefix[position]
            position = p
            start[next_fetch] = max(engine_free, now)
            engine_free = arrive[next_fetch] = start[next_fetch] + copy_seconds[next_fetch]
            next_fetch += 1
        now += prefix[wait[i]] - prefix[position]
        position = wait[i]
        if arrive[i] > now:
            stall[i] = arrive[i] - now
            now = arrive[i]
    now += prefix[-1] - prefix[position]
    return CopyTimes(tuple(start), tuple(arrive), tuple(stall), now)
