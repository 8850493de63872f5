"""The scheduler: Liveness + budget + cost model → Plan.

Read :func:`schedule` top to bottom; it is a list of passes over plain data:

1. *occurrences* — each weight's spans merged into the stretches it stays in the arena, three
   ways: never split, split where the compute in a gap hides a refetch (by cost), split at
   every gap (the most frugal; feasibility and :func:`minimum_budget` use it);
2. *groups* — occurrences coalesced into transfers (one copy for many small tensors);
3. *placement* — for an arena capacity, the position each transfer is fetched at and its
   offset in the arena (first fit, transfers issued in order as early as memory allows);
4. *timing* — a two-resource simulation (compute, copy engine) with the cost model;
5. *residency* — a search over the streaming window size: the rest of the budget holds the
   weights whose streaming costs the most per byte, chosen by score, not by order;
6. the candidate with the lowest predicted time per call over ``calls`` calls wins (near-ties,
   within ``TIE_TOLERANCE``, go to fewer bytes moved, then fewer copies). It becomes a
   :class:`~vramfx.plan.plan.Plan`, checked by :func:`~vramfx.plan.check.check_plan` before
   it is returned.

The memory model is the runtime's: one arena of ``arena_bytes`` for streamed weights, one
allocation per resident weight (each rounded up to ``alignment``), one upcast region for the casts
of weights stored in a low dtype, activations outside all three::

    peak_bytes = resident_bytes + arena_bytes + upcast_bytes + activation_peak_bytes + workspace_bytes

and ``peak_bytes <= budget_bytes``. Every interval is half-open, ``[begin, end)``: begin
inclusive, end exclusive.

Feasibility is one fixed question — does :func:`_place` fit every weight, split at every gap
and not coalesced, into an arena of the free budget — answered by the same code in
:func:`minimum_budget` and :func:`schedule`, so the minimum is exact: it plans, one byte less
raises :class:`~vramfx.errors.BudgetError`.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

from vramfx.errors import BudgetError
from vramfx.plan.check import check_plan
from vramfx.plan.costs import CostModel, priced_node_seconds
from vramfx.plan.plan import Cast, Plan, PlannedWeight, Prediction, Transfer
from vramfx.plan.simulate import simulate_copies
from vramfx.plan.types import Liveness
from vramfx.util import FreeList, align_up, format_bytes

logger = logging.getLogger(__name__)

#: Candidate streaming windows tried between the minimum and the whole free budget.
NUM_WINDOW_CANDIDATES = 12
#: Candidate windows below the minimum (the rest of the weights must then make room).
NUM_LOW_WINDOWS = 5
#: How often a resident set whose remaining weights do not place is shrunk and retried.
MAX_RESIDENT_REPAIRS = 6
#: Candidates whose predicted time is within this fraction of the best count as tied; the tie
#: goes to the one that streams fewer bytes per call.
TIE_TOLERANCE = 0.01
#: A weight is dropped between two uses when the compute in the gap takes at least this many
#: times its transfer: the refetch is then hidden, and the arena holds something else meanwhile.
SPLIT_GAP_FACTOR = 2.0


#: ``next_begin`` of a weight's last occurrence.
_NO_NEXT = 2**62


# --------------------------------------------------------------------------------------------
# Plain records private to the scheduler


class _Occurrence(NamedTuple):
    """One stretch ``[begin, end)`` a weight spends in the arena: begin inclusive, end exclusive.

    ``begin`` is the first position that reads it, ``end`` one past the last span covered.
    """

    weight: int  # index into Liveness.weights
    begin: int
    end: int
    nbytes: int
    size: int  # nbytes rounded up to the alignment: what it occupies in the arena
    next_begin: int  # begin of the weight's next occurrence; a large sentinel if none


class _Group(NamedTuple):
    """Occurrences fetched by one copy; they sit back to back in one arena block.

    Lives ``[wait, drop)`` at least: ``wait`` is the first member's begin, ``drop`` the
    latest member end.
    """

    members: tuple[_Occurrence, ...]
    wait: int
    drop: int
    nbytes: int
    size: int


@dataclass(frozen=True)
class _Placement:
    """Where and when each group goes: ``fetch[i]`` position, ``offset[i]`` of its block."""

    fetch: tuple[int, ...]
    offset: tuple[int, ...]
    arena_bytes: int


@dataclass(frozen=True)
class _Timing:
    """What the two-resource simulation predicts for one steady-state call."""

    seconds: float
    stall_seconds: float
    copy_seconds: float
    group_stall: tuple[float, ...]
    group_copy: tuple[float, ...]


@dataclass(frozen=True)
class _Option:
    """One complete candidate plan, before it becomes a Plan record."""

    window_bytes: int
    resident: frozenset[int]
    resident_bytes: int
    loaded_bytes: int  # exact bytes of the resident weights, moved once
    load_seconds: float
    groups: tuple[_Group, ...]
    placement: _Placement
    timing: _Timing
    streamed_bytes: int

    def mean_seconds(self, calls: int) -> float:
        """Predicted seconds per call over ``calls`` calls: the resident load amortised."""
        return self.timing.seconds + self.load_seconds / calls


# --------------------------------------------------------------------------------------------
# Public entry points


def schedule(
    liveness: Liveness,
    budget_bytes: int,
    *,
    cost_model: CostModel,
    calls: int = 1,
    alignment: int = 64,
    margin_bytes: int = 0,
    coalesce_bytes: int = 4 * 2**20,
    coalesce_positions: int = 64,
) -> Plan:
    """Choose resident weights, transfer groups, fetch/wait/drop positions and arena offsets.

    Parameters
    ----------
    liveness:
        Sizes and use positions of every weight, the activation profile and per-node costs.
    budget_bytes:
        Device bytes the plan may use at any moment: resident weights, the arena, activations
        and workspace together.
    cost_model:
        Turns FLOPs and bytes into seconds; plans are compared by its predictions.
    calls:
        How many times the compiled model is expected to be called (a diffusion loop: 20-50).
        Resident weights are loaded once and kept, so more calls favour residency.
    alignment:
        Every arena offset and every resident allocation is rounded up to this many bytes
        (a power of two; 64 on CPU, 256 on CUDA).
    margin_bytes:
        Extra headroom reserved on top of ``liveness.workspace_bytes``.
    coalesce_bytes:
        Weights smaller than this are coalesced into one transfer while the group stays within
        this many bytes; weights at least this large may be dropped and fetched again between
        distant uses.
    coalesce_positions:
        A group only gathers occurrences that begin within this many positions of its first.

    Returns
    -------
    Plan
        A plan that passed :func:`~vramfx.plan.check.check_plan`.

    Raises
    ------
    BudgetError
        If no plan fits; ``minimum_bytes`` is the smallest budget that does
        (:func:`minimum_budget`).
    ValueError
        If an argument is out of range or ``liveness`` is malformed.

    Examples
    --------
    Three light nodes, two weights; the budget holds both, and over a loop of calls both stay
    resident:

    >>> from vramfx.plan.types import Liveness, WeightLife
    >>> lv = Liveness(
    ...     num_positions=3,
    ...     weights=(WeightLife("a", 1024, (0,), ((0, 1),)),
    ...              WeightLife("b", 1024, (2,), ((2, 3),))),
    ...     activation_bytes=(64, 64, 64), flops=(0.0,) * 3, memory_bytes=(0,) * 3)
    >>> plan = schedule(lv, 8192, cost_model=CostModel.for_device("cpu"), calls=50)
    >>> plan.resident, plan.streamed_bytes
    (('a', 'b'), 0)
    """
    _validate_arguments(
        liveness,
        calls=calls,
        alignment=alignment,
        margin_bytes=margin_bytes,
        coalesce_bytes=coalesce_bytes,
        coalesce_positions=coalesce_positions,
    )
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral):
        raise ValueError(f"schedule: budget_bytes must be an int >= 0, got {budget_bytes!r}")
    budget_bytes = int(budget_bytes)
    if budget_bytes < 0:
        raise ValueError(f"schedule: budget_bytes must be an int >= 0, got {budget_bytes!r}")

    workspace_bytes = liveness.workspace_bytes + margin_bytes
    activation_peak = liveness.activation_peak_bytes
    casts, upcast_bytes = planned_casts(liveness, alignment)
    window_max = budget_bytes - activation_peak - workspace_bytes - upcast_bytes

    streamable = _streamable(liveness)
    zero_byte = frozenset(i for i, w in enumerate(liveness.weights) if w.uses and w.nbytes == 0)
    split_all = _occurrences(liveness, streamable, alignment, split="all")
    window_min = _minimum_window(_groups(_ordered(split_all), 0, 0), liveness.num_positions)
    if window_max < window_min:
        raise _budget_error(
            budget_bytes,
            window_min,
            activation_peak,
            workspace_bytes,
            liveness.workspace_bytes,
            upcast_bytes=upcast_bytes,
        )

    node_seconds = priced_node_seconds(liveness, cost_model)
    prefix = [0.0, *accumulate(node_seconds)]
    by_cost = _occurrences(
        liveness,
        streamable,
        alignment,
        split="cost",
        cost_model=cost_model,
        prefix=prefix,
        coalesce_bytes=coalesce_bytes,
    )
    unsplit = _occurrences(liveness, streamable, alignment, split="none")
    # Each way to split is tried with coalescing; if none places, every gap is split and,
    # last, coalescing is dropped too, which is exactly what minimum_budget assumes.
    preferred = [(_ordered(unsplit), coalesce_bytes, coalesce_positions)]
    if by_cost != unsplit:
        preferred.append((_ordered(by_cost), coalesce_bytes, coalesce_positions))
    fallback = []
    if split_all not in (unsplit, by_cost):
        fallback.append((_ordered(split_all), coalesce_bytes, coalesce_positions))
    fallback.append((_ordered(split_all), 0, 0))
    search = _Search(
        liveness=liveness,
        cost_model=cost_model,
        prefix=prefix,
        alignment=alignment,
        preferred=preferred,
        fallback=fallback,
    )
    options = search.candidates(
        window_min=window_min,
        window_max=window_max,
        streamable=streamable,
        zero_byte=zero_byte,
        calls=calls,
    )
    best = _choose(options, calls)
    plan = _to_plan(
        best,
        liveness,
        budget_bytes=budget_bytes,
        cost_model=cost_model,
        calls=calls,
        alignment=alignment,
        workspace_bytes=workspace_bytes,
        compute_seconds=prefix[-1],
        casts=casts,
        upcast_bytes=upcast_bytes,
    )
    logger.debug(
        "schedule: %d candidates, chose window %s with %d resident, %.3g s/call",
        len(options),
        format_bytes(best.window_bytes),
        len(best.resident),
        best.mean_seconds(calls),
    )
    check_plan(plan, liveness)
    return plan


def minimum_budget(
    liveness: Liveness,
    *,
    alignment: int = 64,
    margin_bytes: int = 0,
    coalesce_bytes: int = 4 * 2**20,
    coalesce_positions: int = 64,
) -> int:
    """The smallest ``budget_bytes`` for which :func:`schedule` finds a plan.

    Nothing resident, every weight dropped at every gap between its spans, no coalescing, the
    whole free budget as the arena: the smallest arena that placement fits in, found by binary
    search, plus the activation peak, workspace and the upcast region of weights stored low.
    ``schedule`` at this budget succeeds, and one byte less raises
    :class:`~vramfx.errors.BudgetError` (with the same ``alignment`` and ``margin_bytes``).

    Parameters
    ----------
    liveness, alignment, margin_bytes:
        As for :func:`schedule`.
    coalesce_bytes, coalesce_positions:
        Accepted so a caller can pass :func:`schedule`'s keyword arguments unchanged; the
        minimum does not depend on them (``schedule`` stops coalescing where it does not fit).

    Returns
    -------
    int
        Bytes.

    Examples
    --------
    >>> from vramfx.plan.types import Liveness, WeightLife
    >>> lv = Liveness(
    ...     num_positions=3,
    ...     weights=(WeightLife("a", 1000, (0,), ((0, 1),)),
    ...              WeightLife("b", 1000, (2,), ((2, 3),))),
    ...     activation_bytes=(10, 20, 10), flops=(0.0,) * 3, memory_bytes=(0,) * 3)
    >>> minimum_budget(lv)  # one weight at a time, 1000 rounded up to 1024, plus 20
    1044
    """
    _validate_arguments(
        liveness,
        calls=1,
        alignment=alignment,
        margin_bytes=margin_bytes,
        coalesce_bytes=coalesce_bytes,
        coalesce_positions=coalesce_positions,
    )
    occurrences = _occurrences(liveness, _streamable(liveness), alignment)
    # Coalescing only ever lengthens lifetimes and enlarges blocks, so the minimum has none.
    window = _minimum_window(_groups(_ordered(occurrences), 0, 0), liveness.num_positions)
    upcast_bytes = planned_casts(liveness, alignment)[1]
    return window + liveness.activation_peak_bytes + liveness.workspace_bytes + margin_bytes + upcast_bytes


# --------------------------------------------------------------------------------------------
# Validation and errors


def _validate_arguments(
    liveness: Liveness,
    *,
    calls: int,
    alignment: int,
    margin_bytes: int,
    coalesce_bytes: int,
    coalesce_positions: int,
) -> None:
    """Reject out-of-range arguments and malformed liveness records with a ValueError."""
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an int >= 1, got {calls!r}")
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= 1, got {alignment!r}")
    if margin_bytes < 0:
        raise ValueError(f"margin_bytes must be >= 0, got {margin_bytes!r}")
    if coalesce_bytes < 0:
        raise ValueError(f"coalesce_bytes must be >= 0, got {coalesce_bytes!r}")
    if coalesce_positions < 0:
        raise ValueError(f"coalesce_positions must be >= 0, got {coalesce_positions!r}")
    num_positions = liveness.num_positions
    for field_name in ("activation_bytes", "flops", "memory_bytes"):
        if len(getattr(liveness, field_name)) != num_positions:
            raise ValueError(
                f"liveness.{field_name} has {len(getattr(liveness, field_name))} entries, "
                f"expected num_positions={num_positions}"
            )
    if liveness.workspace_bytes < 0:
        raise ValueError(f"liveness.workspace_bytes must be >= 0, got {liveness.workspace_bytes}")
    seen: set[str] = set()
    previous_first = -1
    for w in liveness.weights:
        if w.name in seen:
            raise ValueError(f"liveness.weights: weight {w.name!r} appears twice")
        seen.add(w.name)
        if w.nbytes < 0:
            raise ValueError(f"liveness.weights: weight {w.name!r} has nbytes {w.nbytes} < 0")
        if not w.uses:
            if w.spans:
                raise ValueError(f"liveness.weights: weight {w.name!r} has spans but no uses")
            continue
        if w.uses[0] < previous_first:
            raise ValueError(
                f"liveness.weights must be ordered by first use; {w.name!r} comes too late"
            )
        previous_first = w.uses[0]
        if any(b <= a for a, b in zip(w.uses, w.uses[1:])):
            raise ValueError(f"liveness.weights: uses of {w.name!r} are not strictly sorted")
        if w.uses[0] < 0 or w.uses[-1] >= num_positions:
            raise ValueError(
                f"liveness.weights: uses of {w.name!r} fall outside [0, {num_positions})"
            )
        end = -1
        for begin, stop in w.spans:
            if begin < end or stop <= begin or stop > num_positions:
                raise ValueError(
                    f"liveness.weights: spans of {w.name!r} must be sorted, disjoint, "
                    f"non-empty half-open ranges within [0, {num_positions}); got {w.spans}"
                )
            end = stop
        # Every use must fall in a span, or the weight could be dropped while it is read.
        starts = [s for s, _ in w.spans]
        for u in w.uses:
            k = bisect_left(starts, u + 1) - 1
            if k < 0 or not w.spans[k][0] <= u < w.spans[k][1]:
                raise ValueError(
                    f"liveness.weights: use {u} of {w.name!r} lies in none of its spans {w.spans}"
                )


def _budget_error(
    budget_bytes: int,
    window_min: int,
    activation_peak: int,
    workspace_bytes: int,
    liveness_workspace: int,
    *,
    upcast_bytes: int = 0,
) -> BudgetError:
    """The BudgetError for a budget below the minimum, with the numbers a user needs."""
    minimum = window_min + activation_peak + workspace_bytes + upcast_bytes
    parts = [f"activations {format_bytes(activation_peak)}"]
    if workspace_bytes:
        margin = workspace_bytes - liveness_workspace
        detail = f" incl. margin {format_bytes(margin)}" if margin else ""
        parts.append(f"workspace {format_bytes(workspace_bytes)}{detail}")
    if upcast_bytes:
        parts.append(f"upcast buffers {format_bytes(upcast_bytes)}")
    parts.append(f"largest weights needed at once {format_bytes(window_min)}")
    message = (
        f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the minimum of "
        f"{format_bytes(minimum, round_up=True)} for this model and input "
        f"({', '.join(parts)}); pass budget >= {format_bytes(minimum, round_up=True)} "
        f"(budget_bytes >= {minimum})"
    )
    return BudgetError(message, minimum_bytes=minimum)


# --------------------------------------------------------------------------------------------
# Pass 1: occurrences


def _streamable(liveness: Liveness) -> tuple[int, ...]:
    """Indices of the weights that take arena space: read at least once and not empty."""
    return tuple(i for i, w in enumerate(liveness.weights) if w.uses and w.nbytes > 0)


def _occurrences(
    liveness: Liveness,
    indices: tuple[int, ...],
    alignment: int,
    *,
    split: str = "all",
    cost_model: CostModel | None = None,
    prefix: list[float] | None = None,
    coalesce_bytes: int = 0,
) -> dict[int, tuple[_Occurrence, ...]]:
    """Each weight's spans merged into occurrences, per weight index.

    ``split="all"``: every non-empty gap between spans splits (the most memory-frugal choice;
    feasibility and ``minimum_budget`` use it). ``split="none"``: one occurrence per weight.
    ``split="cost"``: a gap splits only for a weight of at least ``coalesce_bytes`` whose gap
    compute (from ``prefix``, cumulative node seconds) takes at least ``SPLIT_GAP_FACTOR``
    times its transfer, so the refetch hides. Adjacent spans never split: a refetch at the
    same position gains nothing.
    """
    assert split in ("all", "none", "cost")
    result: dict[int, tuple[_Occurrence, ...]] = {}
    for i in indices:
        w = liveness.weights[i]
        size = align_up(w.nbytes, alignment)
        threshold_s = 0.0 if split == "all" else math.inf
        if split == "cost" and w.nbytes >= coalesce_bytes:
            assert cost_model is not None and prefix is not None
            threshold_s = SPLIT_GAP_FACTOR * cost_model.transfer_seconds(w.nbytes)
        bounds = []
        begin, end = w.spans[0]
        for next_begin, next_end in w.spans[1:]:
            gap_s = 0.0 if prefix is None else prefix[next_begin] - prefix[end]
            if next_begin > end and (split == "all" or gap_s >= threshold_s):
                bounds.append((begin, end))
                begin = next_begin
            end = next_end
        bounds.append((begin, end))
        nexts = [b for b, _ in bounds[1:]] + [_NO_NEXT]
        result[i] = tuple(
            _Occurrence(i, b, e, w.nbytes, size, n) for (b, e), n in zip(bounds, nexts)
        )
    return result


# --------------------------------------------------------------------------------------------
# Pass 2: transfer groups


def _ordered(occurrences: dict[int, tuple[_Occurrence, ...]]) -> list[_Occurrence]:
    """All occurrences by begin position (ties: weight order), the order transfers go in."""
    return sorted(
        (occ for occs in occurrences.values() for occ in occs),
        key=lambda o: (o.begin, o.weight, o.end),
    )


def _groups(
    ordered: list[_Occurrence],
    coalesce_bytes: int,
    coalesce_positions: int,
) -> tuple[_Group, ...]:
    """Occurrences (ordered by begin), runs of small ones coalesced into one transfer each.

    A candidate joins the open group while the group stays within ``coalesce_bytes``
    (aligned), it begins within ``coalesce_positions`` of the group's first begin, it ends
    within ``2 * coalesce_positions`` of that begin (a long-lived member would pin the whole
    block), and the group does not already hold the same weight.

    A group holds all its members over ``[wait, drop)``, so the copies of one weight must not
    meet: a group may not end after any member's next occurrence begins, nor begin before
    the group holding a member's previous occurrence is dropped. Otherwise a use would lie
    in two transfers.
    """
    groups: list[_Group] = []
    members: list[_Occurrence] = []
    weights: set[int] = set()
    dropped_at: dict[int, int] = {}  # weight -> drop of the closed group with its last copy
    first = drop = nbytes = size = limit = 0

    def close() -> None:
        groups.append(_Group(tuple(members), first, drop, nbytes, size))
        for m in members:
            dropped_at[m.weight] = drop

    for occ in ordered:
        if members and (
            size + occ.size > coalesce_bytes
            or occ.begin - first > coalesce_positions
            or occ.end - first > 2 * coalesce_positions
            or occ.weight in weights
            or max(drop, occ.end) > min(limit, occ.next_begin)
            or dropped_at.get(occ.weight, 0) > first
        ):
            close()
            members = []
        if not members:
            first, drop, nbytes, size, limit = occ.begin, occ.end, 0, 0, _NO_NEXT
            weights = set()
        members.append(occ)
        weights.add(occ.weight)
        drop = max(drop, occ.end)
        nbytes += occ.nbytes
        size += occ.size
        limit = min(limit, occ.next_begin)
    if members:
        close()
    return tuple(groups)


# --------------------------------------------------------------------------------------------
# Pass 3: placement (positions and arena offsets; no seconds involved)


def _place(groups: tuple[_Group, ...], capacity: int) -> _Placement | None:
    """Issue the groups in order, each as early as a first-fit arena of ``capacity`` allows.

    Group ``i`` is fetched at the first position ``p >= fetch[i - 1]`` at which, after every
    group with ``drop <= p`` is freed, a free block of its size exists. Returns None when a
    group cannot be fetched by its ``wait`` (the capacity is infeasible).
    """
    gaps = FreeList(capacity)
    live: list[tuple[int, int, int]] = []  # heap of (drop, offset, size)
    fetch: list[int] = []
    offset: list[int] = []
    position = 0
    arena_bytes = 0

    def release(upto: int) -> None:
        while live and live[0][0] <= upto:
            _, start, size = heapq.heappop(live)
            gaps.release(start, size)

    for group in groups:
        if group.size > capacity:
            return None
        release(position)
        while (start := gaps.allocate(group.size)) is None:
            assert live, "an empty arena of at least the group's size has room for it"
            position = live[0][0]
            if position > group.wait:
                return None
            release(position)
        heapq.heappush(live, (group.drop, start, group.size))
        fetch.append(position)
        offset.append(start)
        arena_bytes = max(arena_bytes, start + group.size)
    return _Placement(tuple(fetch), tuple(offset), arena_bytes)


def _minimum_window(groups: tuple[_Group, ...], num_positions: int) -> int:
    """Smallest arena capacity :func:`_place` fits ``groups`` in, by binary search.

    The result ``c`` always places, and ``c - 1`` never does (feasibility only changes at
    multiples of the alignment, and the search settles on the boundary it finds), which is
    what keeps ``minimum_budget`` and ``schedule`` exact.
    """
    if not groups:
        return 0
    # Lower bound: the blocks that must be in the arena together at some position.
    delta = [0] * (num_positions + 1)
    for g in groups:
        delta[g.wait] += g.size
        delta[g.drop] -= g.size
    need = max(accumulate(delta))
    low = max(need, max(g.size for g in groups))
    # Upper bound: the sum of all blocks; first fit then always finds room at issue time.
    high = sum(g.size for g in groups)
    assert _place(groups, high) is not None, "placement must fit in the sum of all blocks"
    if _place(groups, low) is not None:
        return low
    while high - low > 1:  # invariant: low infeasible, high feasible
        mid = (low + high) // 2
        if _place(groups, mid) is not None:
            high = mid
        else:
            low = mid
    return high


# --------------------------------------------------------------------------------------------
# Pass 4: timing


def _simulate(
    groups: tuple[_Group, ...],
    placement: _Placement,
    prefix: list[float],
    cost_model: CostModel,
) -> _Timing:
    """One steady-state call of ``groups`` placed so (:func:`~vramfx.plan.simulate.simulate_copies`).

    Compute also loses ``copy_interference`` seconds per second of copying, counted as stall of
    the group whose copy it is.
    """
    copy = [cost_model.transfer_seconds(g.nbytes) for g in groups]
    times = simulate_copies(placement.fetch, [g.wait for g in groups], copy, prefix)
    interference = [cost_model.copy_interference * c for c in copy]
    stall = [s + i for s, i in zip(times.stall, interference)]
    return _Timing(
        seconds=times.compute_end + sum(interference),
        stall_seconds=sum(stall),
        copy_seconds=sum(copy),
        group_stall=tuple(stall),
        group_copy=tuple(copy),
    )


# --------------------------------------------------------------------------------------------
# Pass 5: residency and the window search


_Splitting = tuple[list[_Occurrence], int, int]  # occurrences in order, coalescing knobs
_Streamed = tuple[tuple[_Group, ...], _Placement, _Timing]


@dataclass
class _Search:
    """What every candidate shares: the liveness, the costs, and the ways to split weights.

    ``preferred`` splittings are all evaluated (holding a weight over a gap and refetching it
    each win somewhere); ``fallback`` ones are tried in order only when no preferred one fits.
    """

    liveness: Liveness
    cost_model: CostModel
    prefix: list[float]
    alignment: int
    preferred: list[_Splitting]
    fallback: list[_Splitting]
    _groups_cache: dict[tuple[bool, int, tuple[int, ...]], tuple[_Group, ...]] = field(
        default_factory=dict
    )

    def stream(self, indices: tuple[int, ...], capacity: int) -> list[_Streamed]:
        """Every way to stream ``indices`` through an arena of ``capacity`` bytes that fits."""
        results: list[_Streamed] = []
        for tiers in (self.preferred, self.fallback):
            for tier, (ordered, coalesce_bytes, coalesce_positions) in enumerate(tiers):
                key = (tiers is self.fallback, tier, indices)
                groups = self._groups_cache.get(key)
                if groups is None:
                    chosen = set(indices)
                    groups = _groups(
                        [o for o in ordered if o.weight in chosen],
                        coalesce_bytes,
                        coalesce_positions,
                    )
                    self._groups_cache[key] = groups
                placement = _place(groups, capacity)
                if placement is not None:
                    timing = _simulate(groups, placement, self.prefix, self.cost_model)
                    results.append((groups, placement, timing))
                    if tiers is self.fallback:
                        break
            if results:
                break
        return results

    def options(
        self, window: int, resident: frozenset[int], streamable: tuple[int, ...], capacity: int
    ) -> list[_Option]:
        """Candidates keeping ``resident`` resident and streaming the rest of ``streamable``.

        The arena gets everything of ``capacity`` the resident weights leave.
        """
        weights = self.liveness.weights
        indices = tuple(i for i in streamable if i not in resident)
        resident_bytes = sum(align_up(weights[i].nbytes, self.alignment) for i in resident)
        load = sum(
            self.cost_model.transfer_seconds(weights[i].nbytes)
            for i in resident
            if weights[i].nbytes
        )
        return [
            _Option(
                window_bytes=window,
                resident=resident,
                resident_bytes=resident_bytes,
                loaded_bytes=sum(weights[i].nbytes for i in resident),
                load_seconds=load,
                groups=groups,
                placement=placement,
                timing=timing,
                streamed_bytes=sum(g.nbytes for g in groups),
            )
            for groups, placement, timing in self.stream(indices, capacity - resident_bytes)
        ]

    def candidates(
        self,
        *,
        window_min: int,
        window_max: int,
        streamable: tuple[int, ...],
        zero_byte: frozenset[int],
        calls: int,
    ) -> list[_Option]:
        """Options over a series of streaming windows; always includes the all-streamed ones."""
        options: list[_Option] = []
        # Nothing resident: the whole free budget as arena, and the minimum arena. The latter
        # is feasible by construction, so every budget >= minimum_budget yields a plan.
        for capacity in sorted({window_max, window_min}, reverse=True):
            options += self.options(capacity, zero_byte, streamable, capacity)
        assert options, "the minimum window must place"
        sizes = [align_up(self.liveness.weights[i].nbytes, self.alignment) for i in streamable]
        windows = _candidate_windows(
            min(sizes, default=0), window_min, window_max, self.alignment
        )
        if sum(sizes) <= window_max:
            windows.append(0)  # everything resident
        scored_at: dict[int, _Streamed | None] = {}
        for window in sorted(set(windows)):
            if window >= window_max:
                continue
            # Scores come from streaming everything; below the minimum window that does not
            # fit, so the minimum window's simulation stands in.
            at = max(window, window_min)
            if at not in scored_at:
                streamed = self.stream(streamable, at)
                scored_at[at] = min(streamed, key=lambda s: s[2].seconds) if streamed else None
            ranked = self._fill(window, window_max, streamable, scored_at[at], calls)
            # The rest may still not place (its weights overlap in time); give back the
            # least useful resident weights until it does, a few times at most.
            for _ in range(MAX_RESIDENT_REPAIRS):
                found = self.options(window, frozenset(ranked) | zero_byte, streamable, window_max)
                if found or not ranked:
                    break
                del ranked[-max(1, len(ranked) // 8) :]
            options += found
        return options

    def _fill(
        self,
        window: int,
        window_max: int,
        streamable: tuple[int, ...],
        scored: _Streamed | None,
        calls: int,
    ) -> list[int]:
        """Weights to keep resident, best seconds saved per byte first, in that order.

        A weight's saving per call is, over every transfer that carries it, its byte share of
        that transfer's copy seconds and of the stall the simulation at this window attributes
        to it, less its load amortised over ``calls``; weights that save nothing stay
        streamed. A weight is taken if the resident set plus the arena the rest still needs
        (at least ``window``, at least the largest weight left streamed) fits ``window_max``;
        otherwise it is skipped and the next one tried.
        """
        weights = self.liveness.weights
        saving = dict.fromkeys(streamable, 0.0)
        if scored is None:
            # Nothing to compare against (a first-fit anomaly): bigger copies save more.
            for i in streamable:
                saving[i] = 1.0
        else:
            groups, _, timing = scored
            for g, copy_s, stall_s in zip(groups, timing.group_copy, timing.group_stall):
                for m in g.members:
                    saving[m.weight] += (copy_s + stall_s) * (m.nbytes / g.nbytes)
            for i in streamable:
                saving[i] -= self.cost_model.transfer_seconds(weights[i].nbytes) / calls
        sizes = {i: align_up(weights[i].nbytes, self.alignment) for i in streamable}
        ranked = sorted(
            (i for i in streamable if saving[i] > 0), key=lambda i: (-saving[i] / sizes[i], i)
        )
        left = sorted((sizes[i], i) for i in streamable)  # still streamed, by size
        chosen = []
        used = 0
        for i in ranked:
            if used + sizes[i] + window > window_max:
                continue
            k = len(left) - 1
            if left[k][1] == i:
                k -= 1
            largest_left = left[k][0] if k >= 0 else 0
            if used + sizes[i] + max(window, largest_left) > window_max:
                continue
            chosen.append(i)
            used += sizes[i]
            del left[bisect_left(left, (sizes[i], i))]
        return chosen


def _candidate_windows(
    window_low: int, window_min: int, window_max: int, alignment: int
) -> list[int]:
    """Streaming windows to try: geometric series below and above ``window_min``.

    Below the minimum window, streaming everything no longer fits, but it may once the
    weights that need the room (a huge embedding) are resident. ``window_low`` is the
    smallest window that still streams anything; all values are multiples of ``alignment``
    (except ``window_min`` and ``window_max`` themselves).
    """
    windows = {window_min}

    def series(low: int, high: int, count: int) -> None:
        if high <= low or count < 2:
            return
        low = max(low, alignment)
        ratio = (high / low) ** (1.0 / (count - 1))
        for k in range(count - 1):
            w = int(low * ratio**k) // alignment * alignment
            windows.add(min(max(w, alignment), high))

    series(window_low, window_min, NUM_LOW_WINDOWS)
    series(window_min, window_max, NUM_WINDOW_CANDIDATES)
    return sorted(w for w in windows if w < window_max)


def _choose(options: list[_Option], calls: int) -> _Option:
    """Lowest predicted time; near-ties go to fewer bytes moved per call, then fewer copies.

    Bytes moved per call count the resident load spread over the calls: with one call,
    keeping a weight resident moves as many bytes as streaming it, so it is no tie-breaker.
    """
    best = min(o.mean_seconds(calls) for o in options)
    limit = best * (1.0 + TIE_TOLERANCE) + 1e-12
    tied = [o for o in options if o.mean_seconds(calls) <= limit]
    return min(
        tied,
        key=lambda o: (
            o.streamed_bytes + o.loaded_bytes / calls,
            len(o.groups),
            o.mean_seconds(calls),
            o.window_bytes,
        ),
    )


# --------------------------------------------------------------------------------------------
# Pass 6: the Plan record


def _to_plan(
    option: _Option,
    liveness: Liveness,
    *,
    budget_bytes: int,
    cost_model: CostModel,
    calls: int,
    alignment: int,
    workspace_bytes: int,
    compute_seconds: float,
    casts: tuple[Cast, ...] = (),
    upcast_bytes: int = 0,
) -> Plan:
    """Turn the chosen option into the frozen, serialisable Plan."""
    weights = liveness.weights
    transfers = []
    for k, (group, fetch, start) in enumerate(
        zip(option.groups, option.placement.fetch, option.placement.offset)
    ):
        offsets = []
        at = start
        for m in group.members:
            offsets.append(at)
            at += m.size
        transfers.append(
            Transfer(
                id=k,
                names=tuple(weights[m.weight].name for m in group.members),
                offsets=tuple(offsets),
                sizes=tuple(m.nbytes for m in group.members),
                fetch=fetch,
                wait=group.wait,
                drop=group.drop,
            )
        )
    activation_peak = liveness.activation_peak_bytes
    arena_bytes = option.placement.arena_bytes
    timing = option.timing
    return Plan(
        budget_bytes=budget_bytes,
        peak_bytes=option.resident_bytes + arena_bytes + upcast_bytes + activation_peak + workspace_bytes,
        resident_bytes=option.resident_bytes,
        streamed_bytes=option.streamed_bytes,
        weight_bytes=liveness.weight_bytes,
        activation_peak_bytes=activation_peak,
        workspace_bytes=workspace_bytes,
        arena_bytes=arena_bytes,
        alignment=alignment,
        num_positions=liveness.num_positions,
        calls=calls,
        resident=tuple(w.name for i, w in enumerate(weights) if i in option.resident),
        transfers=tuple(transfers),
        weights=tuple(
            PlannedWeight(w.name, w.nbytes, tuple(w.shape), w.dtype, w.compute_dtype, w.format) for w in weights
        ),
        predicted=Prediction(
            seconds_per_call=timing.seconds,
            stall_seconds=timing.stall_seconds,
            compute_seconds=compute_seconds,
            transfer_seconds=timing.copy_seconds,
            first_call_seconds=option.load_seconds + timing.seconds,
        ),
        cost_model=cost_model.to_dict(),
        position_names=tuple(liveness.position_names),
        casts=casts,
        upcast_bytes=upcast_bytes,
    )


def planned_casts(liveness: Liveness, alignment: int = 64) -> tuple[tuple[Cast, ...], int]:
    """One cast per span of every weight stored low, each in a static slot of the upcast region.

    A cast per span, not per transfer: its buffer then lives exactly as long as the span
    whatever the schedule, so the region is laid out from liveness alone. Slots are static, as
    the arena's are, because transient buffers of mixed sizes from the allocator fragment it
    past the budget. Casts are placed in position order at the lowest aligned offset free over
    their span (first fit).

    Returns
    -------
    tuple[tuple[Cast, ...], int]
        The casts in position order, and the region's size in bytes.
    """
    spans = sorted(
        (begin, end, w.name, w.compute_nbytes)
        for w in liveness.weights
        if w.compute_dtype is not None
        for begin, end in w.spans
    )
    casts: list[Cast] = []
    live: list[tuple[int, int, int]] = []  # (offset, size, end) of slots still held
    region = 0
    for begin, end, name, nbytes in spans:
        live = sorted(slot for slot in live if slot[2] > begin)
        size = align_up(nbytes, alignment)
        offset = 0
        for held, held_size, _ in live:
            if offset + size <= held:
                break
            offset = max(offset, held + held_size)
        live.append((offset, size, end))
        casts.append(Cast(name, begin, end, nbytes, offset))
        region = max(region, offset + size)
    return tuple(casts), region
