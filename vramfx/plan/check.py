"""The plan invariant checker: one function that says whether a Plan is safe to run.

The scheduler runs it on every plan before returning it; tests and a debug mode run it too.
Each failure raises :class:`~vramfx.errors.PlanInvariantError` whose message starts with the
invariant's name (``over budget:``, ``not ready before use:``, ...) and names the weight,
transfer or position involved. Every lifetime is half-open: a transfer holds its arena bytes
over ``[fetch, drop)``, begin inclusive, end exclusive.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from itertools import accumulate

from vramfx.errors import PlanInvariantError
from vramfx.plan.plan import Plan, Transfer
from vramfx.plan.types import Liveness
from vramfx.util import align_up

#: Relative tolerance for predicted seconds that should add up.
_SECONDS_RTOL = 1e-6


def _fail(invariant: str, detail: str) -> PlanInvariantError:
    """The error for one broken invariant."""
    return PlanInvariantError(f"{invariant}: {detail}")


def check_plan(plan: Plan, liveness: Liveness) -> None:
    """Raise if ``plan`` breaks an invariant that makes it safe to run on ``liveness``.

    Invariants, each named at the start of the error message:

    - ``plan does not match liveness``: same weights (names, sizes), positions, activation peak.
    - ``malformed transfer``: members, offsets and sizes line up; ``fetch <= wait < drop``;
      ids unique; transfers listed in fetch order; sizes equal the weights' sizes.
    - ``resident weight dropped``: no transfer names a resident weight.
    - ``weight neither resident nor streamed``: every weight read by the graph is one or the
      other (a weight no position reads needs neither).
    - ``not ready before use``: every use ``u`` of a streamed weight lies in exactly one of
      its transfers with ``fetch <= wait <= u < drop``; a span is never split between
      transfers (its views must stay put); no fetched member goes unread.
    - ``dropped before last use``: no transfer drops a weight before the end of a span it
      covers, nor after ``num_positions``.
    - ``arena overlap``: members of transfers whose lifetimes intersect occupy disjoint bytes;
      every member lies in ``[0, arena_bytes)`` at an offset that is a multiple of
      ``alignment``.
    - ``over budget``: ``peak_bytes = resident + arena + upcast + activation peak +
      workspace`` and is at most ``budget_bytes``; at every position, resident + live
      transfers + upcast + ``A(t)`` + workspace fits the budget.
    - ``summary disagrees``: resident/streamed/weight bytes and the prediction add up.
    - ``cast misplaced``: a weight stored in another dtype than the graph reads it in is cast
      once at the start of each of its spans, into a buffer of its compute-dtype bytes that
      lives to the span's end; no other weight is cast. ``cast overlap``: buffers live at the
      same time occupy disjoint bytes of ``[0, upcast_bytes)``, at aligned offsets.

    Runs in ``O((W + S + P) log(W + S))`` for ``W`` weights, ``S`` transfer members and
    ``P`` positions, cheap enough to run on every plan.

    Parameters
    ----------
    plan:
        The plan to check.
    liveness:
        The liveness record the plan was made from.

    Raises
    ------
    PlanInvariantError
        On the first broken invariant found.

    Examples
    --------
    >>> from vramfx.plan.costs import CostModel
    >>> from vramfx.plan.schedule import schedule
    >>> from vramfx.plan.types import Liveness, WeightLife
    >>> lv = Liveness(3, (WeightLife("w", 100, (1,), ((1, 2),)),), (0, 0, 0), (0.0,) * 3, (0,) * 3)
    >>> check_plan(schedule(lv, 1024, cost_model=CostModel.for_device("cpu")), lv)
    """
    _check_matches_liveness(plan, liveness)
    _check_transfers_wellformed(plan)
    resident = _check_partition(plan, liveness)
    _check_ready_and_dropped(plan, liveness, resident)
    _check_arena(plan)
    _check_budget(plan, liveness)
    _check_summary(plan, liveness)
    _check_casts(plan, liveness)


def _check_matches_liveness(plan: Plan, liveness: Liveness) -> None:
    """The plan describes the same graph and weights as the liveness record."""
    invariant = "plan does not match liveness"
    if plan.num_positions != liveness.num_positions:
        raise _fail(
            invariant,
            f"num_positions {plan.num_positions} != liveness {liveness.num_positions}",
        )
    if len(plan.weights) != len(liveness.weights):
        raise _fail(
            invariant, f"{len(plan.weights)} planned weights != {len(liveness.weights)} in liveness"
        )
    for planned, life in zip(plan.weights, liveness.weights):
        if planned.name != life.name or planned.nbytes != life.nbytes:
            raise _fail(
                invariant,
                f"planned weight {planned.name!r} ({planned.nbytes} B) != liveness weight "
                f"{life.name!r} ({life.nbytes} B)",
            )
    if plan.activation_peak_bytes != liveness.activation_peak_bytes:
        raise _fail(
            invariant,
            f"activation_peak_bytes {plan.activation_peak_bytes} != liveness "
            f"{liveness.activation_peak_bytes}",
        )
    if plan.workspace_bytes < liveness.workspace_bytes:
        raise _fail(
            invariant,
            f"workspace_bytes {plan.workspace_bytes} < liveness {liveness.workspace_bytes}",
        )
    if plan.alignment < 1 or plan.alignment & (plan.alignment - 1):
        raise _fail(invariant, f"alignment {plan.alignment} is not a power of two")


def _check_transfers_wellformed(plan: Plan) -> None:
    """Each transfer's fields line up, and transfers are listed in fetch order."""
    invariant = "malformed transfer"
    nbytes = {w.name: w.nbytes for w in plan.weights}
    ids: set[int] = set()
    previous_fetch = 0
    for tr in plan.transfers:
        if tr.id in ids:
            raise _fail(invariant, f"transfer id {tr.id} appears twice")
        ids.add(tr.id)
        if not tr.names or not len(tr.names) == len(tr.offsets) == len(tr.sizes):
            raise _fail(
                invariant,
                f"transfer {tr.id} has {len(tr.names)} names, {len(tr.offsets)} offsets, "
                f"{len(tr.sizes)} sizes",
            )
        if len(set(tr.names)) != len(tr.names):
            raise _fail(invariant, f"transfer {tr.id} names a weight twice: {tr.names}")
        if not 0 <= tr.fetch <= tr.wait < tr.drop:
            raise _fail(
                invariant,
                f"transfer {tr.id} {tr.names[0]!r}...: needs 0 <= fetch {tr.fetch} <= "
                f"wait {tr.wait} < drop {tr.drop}",
            )
        if tr.fetch < previous_fetch:
            raise _fail(
                invariant,
                f"transfer {tr.id} is fetched at {tr.fetch}, before the one listed ahead "
                f"of it ({previous_fetch}); transfers must be in fetch order",
            )
        previous_fetch = tr.fetch
        for name, size in zip(tr.names, tr.sizes):
            if name not in nbytes:
                raise _fail(
                    "weight neither resident nor streamed",
                    f"transfer {tr.id} names {name!r}, which is not a weight of the plan",
                )
            if size != nbytes[name]:
                raise _fail(
                    invariant,
                    f"transfer {tr.id} moves {size} B of {name!r}, which has {nbytes[name]} B",
                )


def _check_partition(plan: Plan, liveness: Liveness) -> set[str]:
    """Resident weights are never transferred; every read weight is resident or streamed."""
    resident = set(plan.resident)
    names = {w.name for w in plan.weights}
    if len(resident) != len(plan.resident):
        raise _fail("summary disagrees", f"resident lists a weight twice: {plan.resident}")
    for name in plan.resident:
        if name not in names:
            raise _fail(
                "weight neither resident nor streamed",
                f"resident weight {name!r} is not a weight of the plan",
            )
    streamed: set[str] = set()
    for tr in plan.transfers:
        for name in tr.names:
            if name in resident:
                raise _fail(
                    "resident weight dropped",
                    f"resident weight {name!r} is fetched and dropped by transfer {tr.id} "
                    f"(fetch {tr.fetch}, drop {tr.drop})",
                )
            streamed.add(name)
    for w in liveness.weights:
        if w.uses and w.name not in resident and w.name not in streamed:
            raise _fail(
                "weight neither resident nor streamed",
                f"weight {w.name!r} is read at {w.uses[0]} but neither resident nor fetched",
            )
    return resident


def _check_ready_and_dropped(plan: Plan, liveness: Liveness, resident: set[str]) -> None:
    """Every use lies in exactly one transfer of its weight, whole spans at a time."""
    # weight name -> [(wait, drop, fetch, transfer id)], one entry per transfer naming it
    held: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for tr in plan.transfers:
        for name in tr.names:
            held[name].append((tr.wait, tr.drop, tr.fetch, tr.id))
    num_positions = plan.num_positions
    for w in liveness.weights:
        if w.name in resident or not w.uses:
            continue
        entries = sorted(held[w.name])
        for wait, drop, _, tid in entries:
            if drop > num_positions:
                raise _fail(
                    "dropped before last use",
                    f"transfer {tid} drops {w.name!r} at {drop}, past the last position "
                    f"{num_positions}",
                )
        for (w1, d1, _, t1), (w2, _, _, t2) in zip(entries, entries[1:]):
            if w2 < d1:
                raise _fail(
                    "not ready before use",
                    f"weight {w.name!r} is held by transfers {t1} [{w1}, {d1}) and {t2} from "
                    f"{w2} at once: each use must lie in exactly one transfer",
                )
        waits = [e[0] for e in entries]
        covered = [0] * len(entries)
        for begin, end in w.spans:
            k = bisect_right(waits, begin) - 1
            if k < 0:
                raise _fail(
                    "not ready before use",
                    f"weight {w.name!r} is read at {begin} before any transfer waits for it",
                )
            wait, drop, _, tid = entries[k]
            if drop <= begin:
                raise _fail(
                    "not ready before use",
                    f"weight {w.name!r} is read at {begin}, but transfer {tid} drops it at "
                    f"{drop} and no later transfer waits for it by then",
                )
            if drop < end:
                raise _fail(
                    "dropped before last use",
                    f"transfer {tid} drops {w.name!r} at {drop}, inside its span [{begin}, {end}) "
                    f"(a use or view of it is alive until {end - 1})",
                )
        for u in w.uses:
            k = bisect_right(waits, u) - 1
            if k < 0 or not u < entries[k][1]:
                # Only reachable when a use lies outside every span; name the use anyway.
                raise _fail(
                    "not ready before use",
                    f"weight {w.name!r} is read at {u} where no transfer holds it",
                )
            covered[k] += 1
        for (wait, drop, _, tid), count in zip(entries, covered):
            if count == 0:
                raise _fail(
                    "not ready before use",
                    f"transfer {tid} fetches {w.name!r} for [{wait}, {drop}) where it is never "
                    f"read (a wait later than the use it serves, or a useless fetch)",
                )
    # Transfers naming weights the graph never reads are also useless fetches.
    read = {w.name for w in liveness.weights if w.uses}
    for name, entries in held.items():
        if name not in read:
            raise _fail(
                "not ready before use",
                f"transfer {entries[0][3]} fetches {name!r}, which no position reads",
            )


def _check_arena(plan: Plan) -> None:
    """Members live at the same time never share bytes; all are aligned and in the arena."""
    invariant = "arena overlap"
    alignment = plan.alignment
    by_fetch: dict[int, list[Transfer]] = defaultdict(list)
    by_drop: dict[int, list[Transfer]] = defaultdict(list)
    for tr in plan.transfers:
        for name, offset, size in zip(tr.names, tr.offsets, tr.sizes):
            if offset % alignment:
                raise _fail(
                    invariant,
                    f"{name!r} of transfer {tr.id} sits at offset {offset}, not a multiple of "
                    f"alignment {alignment}",
                )
            if offset < 0 or offset + size > plan.arena_bytes:
                raise _fail(
                    invariant,
                    f"{name!r} of transfer {tr.id} occupies [{offset}, {offset + size}), outside "
                    f"the arena [0, {plan.arena_bytes})",
                )
        by_fetch[tr.fetch].append(tr)
        by_drop[tr.drop].append(tr)
    # Sweep positions; live byte ranges stay sorted and pairwise disjoint, so a new range
    # only needs comparing with its two neighbours.
    live: list[tuple[int, int, str, int]] = []  # (start, end, name, transfer id), by start
    for position in sorted(set(by_fetch) | set(by_drop)):
        for tr in by_drop.get(position, ()):  # drops run before fetches at one position
            for name, offset, size in zip(tr.names, tr.offsets, tr.sizes):
                if size == 0:
                    continue
                k = bisect_left(live, (offset, offset + size, name, tr.id))
                assert live[k] == (offset, offset + size, name, tr.id)
                del live[k]
        for tr in by_fetch.get(position, ()):
            for name, offset, size in zip(tr.names, tr.offsets, tr.sizes):
                if size == 0:
                    continue
                item = (offset, offset + size, name, tr.id)
                k = bisect_left(live, item)
                for other in live[max(k - 1, 0) : k + 1]:
                    if other[0] < item[1] and item[0] < other[1]:
                        raise _fail(
                            invariant,
                            f"{name!r} of transfer {tr.id} at [{item[0]}, {item[1]}) overlaps "
                            f"{other[2]!r} of transfer {other[3]} at [{other[0]}, {other[1]}) "
                            f"at position {position}",
                        )
                live.insert(k, item)


def _check_budget(plan: Plan, liveness: Liveness) -> None:
    """The peak recomputed from its parts fits the budget, and so does every position."""
    invariant = "over budget"
    peak = (
        plan.resident_bytes
        + plan.arena_bytes
        + plan.upcast_bytes
        + plan.activation_peak_bytes
        + plan.workspace_bytes
    )
    if plan.peak_bytes != peak:
        raise _fail(
            invariant,
            f"peak_bytes {plan.peak_bytes} != resident {plan.resident_bytes} + arena "
            f"{plan.arena_bytes} + upcast {plan.upcast_bytes} + activations "
            f"{plan.activation_peak_bytes} + workspace {plan.workspace_bytes} = {peak}",
        )
    if peak > plan.budget_bytes:
        raise _fail(invariant, f"peak_bytes {peak} > budget_bytes {plan.budget_bytes}")
    # Difference array of live transfer bytes over [fetch, drop), then a running sum.
    delta = [0] * (plan.num_positions + 1)
    for tr in plan.transfers:
        occupied = sum(align_up(s, plan.alignment) for s in tr.sizes)
        delta[tr.fetch] += occupied
        delta[min(tr.drop, plan.num_positions)] -= occupied
    fixed = plan.resident_bytes + plan.workspace_bytes + plan.upcast_bytes
    for t, (streamed, activations) in enumerate(
        zip(accumulate(delta), liveness.activation_bytes)
    ):
        if fixed + streamed + activations > plan.budget_bytes:
            raise _fail(
                invariant,
                f"at position {t} resident {plan.resident_bytes} + live transfers {streamed} + "
                f"upcast {plan.upcast_bytes} + activations {activations} + workspace "
                f"{plan.workspace_bytes} > budget {plan.budget_bytes}",
            )
        if streamed > plan.arena_bytes:
            raise _fail(
                invariant,
                f"at position {t} live transfers hold {streamed} B, more than the arena "
                f"{plan.arena_bytes} B",
            )


def _check_summary(plan: Plan, liveness: Liveness) -> None:
    """The totals in the record agree with the parts they summarise."""
    invariant = "summary disagrees"
    nbytes = {w.name: w.nbytes for w in plan.weights}
    resident_bytes = sum(align_up(nbytes[name], plan.alignment) for name in plan.resident)
    if plan.resident_bytes != resident_bytes:
        raise _fail(
            invariant,
            f"resident_bytes {plan.resident_bytes} != {resident_bytes}, the aligned sizes of "
            f"the {len(plan.resident)} resident weights",
        )
    streamed = sum(tr.nbytes for tr in plan.transfers)
    if plan.streamed_bytes != streamed:
        raise _fail(
            invariant,
            f"streamed_bytes {plan.streamed_bytes} != {streamed}, the bytes of all transfers",
        )
    # In-place weights are planned at 0 bytes; weight_bytes still counts them.
    if plan.weight_bytes - plan.in_place_bytes != liveness.weight_bytes:
        raise _fail(
            invariant, f"weight_bytes {plan.weight_bytes} (in place {plan.in_place_bytes}) != liveness "
                       f"{liveness.weight_bytes}"
        )
    if plan.calls < 1:
        raise _fail(invariant, f"calls {plan.calls} < 1")
    p = plan.predicted
    values = (
        p.seconds_per_call,
        p.stall_seconds,
        p.compute_seconds,
        p.transfer_seconds,
        p.first_call_seconds,
    )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise _fail(invariant, f"predicted seconds must be finite and >= 0: {p}")
    expected = p.compute_seconds + p.stall_seconds
    if not math.isclose(p.seconds_per_call, expected, rel_tol=_SECONDS_RTOL, abs_tol=1e-12):
        raise _fail(
            invariant,
            f"predicted seconds_per_call {p.seconds_per_call} != compute "
            f"{p.compute_seconds} + stall {p.stall_seconds}",
        )
    if p.first_call_seconds < p.seconds_per_call * (1 - _SECONDS_RTOL):
        raise _fail(
            invariant,
            f"predicted first_call_seconds {p.first_call_seconds} < steady "
            f"{p.seconds_per_call}",
        )
    if plan.position_names and len(plan.position_names) != plan.num_positions:
        raise _fail(
            invariant,
            f"{len(plan.position_names)} position names for {plan.num_positions} positions",
        )


def _check_casts(plan: Plan, liveness: Liveness) -> None:
    """Each span of a weight stored low starts with one cast, into a slot of its own."""
    invariant = "cast misplaced"
    planned = plan.name_to_weight
    by_name: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for c in plan.casts:
        if c.name not in planned:
            raise _fail(invariant, f"a cast at {c.position} names {c.name!r}, not a weight of the plan")
        by_name[c.name].append((c.position, c.end, c.nbytes))
    for w in liveness.weights:
        p = planned[w.name]
        if (p.dtype, p.compute_dtype, p.format) != (w.dtype, w.compute_dtype, w.format):
            raise _fail(
                invariant,
                f"weight {w.name!r} is planned as {p.stored_as} -> {p.compute_dtype}, liveness has "
                f"{w.format or w.dtype} -> {w.compute_dtype}",
            )
        expected = sorted((b, e, w.compute_nbytes) for b, e in w.spans) if w.compute_dtype else []
        if sorted(by_name.get(w.name, ())) != expected:
            raise _fail(
                invariant,
                f"weight {w.name!r} has casts {sorted(by_name.get(w.name, ()))} as (position, end, "
                f"bytes), expected one per span: {expected}",
            )
    _check_cast_slots(plan)


def _check_cast_slots(plan: Plan) -> None:
    """Cast buffers live at once never share bytes; all are aligned and in the upcast region."""
    invariant = "cast overlap"
    live: list[tuple[int, int, int, str]] = []  # (end position, offset, size, name)
    for c in sorted(plan.casts, key=lambda c: (c.position, c.offset)):
        size = align_up(c.nbytes, plan.alignment)
        if c.offset % plan.alignment or c.offset < 0 or c.offset + c.nbytes > plan.upcast_bytes:
            raise _fail(
                invariant,
                f"the cast of {c.name!r} at {c.position} occupies [{c.offset}, {c.offset + c.nbytes}), "
                f"not aligned to {plan.alignment} or outside the upcast region [0, {plan.upcast_bytes})",
            )
        live = [slot for slot in live if slot[0] > c.position]
        for end, offset, held, name in live:
            if offset < c.offset + size and c.offset < offset + held:
                raise _fail(
                    invariant,
                    f"the cast of {c.name!r} at {c.position} into [{c.offset}, {c.offset + size}) "
                    f"overlaps the one of {name!r} at [{offset}, {offset + held}), held until {end}",
                )
        live.append((c.end, c.offset, size, c.name))
