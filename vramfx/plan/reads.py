"""How weights reach a CPU's kernels: in place, buffered copy or ``O_DIRECT``, chosen by predicted
time.

The three ways (:mod:`vramfx.plan.in_place` says what each costs) are priced with the cost model
and with what the page cache holds when the plan is made (:class:`PageCacheState`, an input of
the plan like the budget: a fixed cost model and a fixed state give the same plan):

- **in place**: free for bytes the page cache holds and keeps. Bytes it does not hold are read by
  page faults inside the kernels, serially, at ``disk_bytes_per_s``: once, on the first call,
  when the weights fit in the memory left (they stay cached); on every call when they do not
  (the kernel evicts pages of this call to read later ones).
- **buffered copy** (``pread`` through the page cache): ``nbytes / link`` of a core's copy, slowed
  beside the kernels (``copy_slowdown``) and slowing them (``copy_interference``), plus the disk's
  time for bytes not cached.
- **O_DIRECT**: ``nbytes / disk`` on the disk controller, overlapped with compute, no core taken.

Each candidate is scheduled (:func:`vramfx.plan.schedule.schedule`) with its prices, and the
lowest predicted time over ``calls`` calls wins; ties go to in place, then to copies through the
page cache. ``O_DIRECT`` is a candidate only when some bytes must come from the disk at every
call: otherwise it would read from the disk what memory already holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from vramfx.plan.costs import CostModel
from vramfx.plan.in_place import choose_in_place, with_in_place, without_in_place
from vramfx.plan.plan import Plan
from vramfx.plan.schedule import schedule
from vramfx.plan.types import Liveness

#: The ways a weight's bytes may reach a CPU kernel, in the order ties are broken.
WAYS = ("in place", "copy", "direct")


@dataclass(frozen=True)
class PageCacheState:
    """What the page cache holds of the weights' files when a plan is made.

    Attributes
    ----------
    cached:
        ``(weight, fraction of its bytes cached)`` pairs; a weight not listed counts as cached.
    available_bytes:
        Memory the kernel can still give the page cache (``MemAvailable``); None: unbounded.
    source:
        Where the figures come from, for people reading the plan.

    Examples
    --------
    >>> PageCacheState().miss_fraction(10**9)
    0.0
    >>> PageCacheState(cached=(("w", 0.0),), available_bytes=250).miss_fraction(1000, {"w": 1000})
    0.75
    """

    cached: tuple[tuple[str, float], ...] = ()
    available_bytes: int | None = None
    source: str = "assumed cached"

    def __post_init__(self) -> None:
        if isinstance(self.cached, Mapping):
            object.__setattr__(self, "cached", tuple(sorted((str(k), float(v)) for k, v in self.cached.items())))
        for name, fraction in self.cached:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"PageCacheState: cached fraction of {name!r} must be in [0, 1], got {fraction!r}")
        if self.available_bytes is not None and self.available_bytes < 0:
            raise ValueError(f"PageCacheState: available_bytes must be >= 0, got {self.available_bytes!r}")

    def cached_bytes(self, sizes: Mapping[str, int]) -> int:
        """Bytes of the weights of ``sizes`` (name: bytes) the page cache holds now."""
        fractions = dict(self.cached)
        return int(sum(n * fractions.get(name, 1.0) for name, n in sizes.items()))

    def miss_fraction(self, total_bytes: int, sizes: Mapping[str, int] | None = None) -> float:
        """The share of ``total_bytes`` read from the disk at every call, steady state: none
        while what is not cached fits in the memory left, else what exceeds it."""
        if total_bytes <= 0 or self.available_bytes is None:
            return 0.0
        cached = self.cached_bytes(sizes) if sizes else total_bytes
        uncached = total_bytes - cached
        if uncached <= self.available_bytes:
            return 0.0
        return min(1.0, max(0.0, 1.0 - (cached + self.available_bytes) / total_bytes))


def schedule_reads(
    liveness: Liveness,
    budget_bytes: int,
    *,
    cost_model: CostModel,
    calls: int,
    alignment: int,
    margin_bytes: int,
    mappable: Collection[str],
    page_cache: PageCacheState,
    ways: Collection[str] = WAYS,
) -> Plan:
    """The CPU plan whose ways of reading weights predict the lowest time over ``calls`` calls.

    Parameters
    ----------
    liveness, budget_bytes, cost_model, calls, alignment, margin_bytes:
        As for :func:`vramfx.plan.schedule.schedule`.
    mappable:
        Weights that can be used in place (stored in a mapped file, aligned).
    page_cache:
        What the page cache holds now.
    ways:
        The ways allowed (a subset of :data:`WAYS`): a user's ``in_place=False`` leaves out
        ``"in place"``, ``bypass_page_cache=True`` leaves only ``"direct"``.

    Returns
    -------
    Plan
        With ``in_place`` and ``reads`` (``"copy"`` or ``"direct"``) set; its prediction
        includes the page faults of weights used in place whose pages are not kept cached.

    Raises
    ------
    BudgetError
        When no schedule fits (the first candidate's error).
    """
    unknown = set(ways) - set(WAYS)
    if unknown or not set(ways) & {"copy", "direct"}:
        raise ValueError(f"ways must hold 'copy' or 'direct' and only {WAYS}, got {sorted(ways)}")
    sizes = {w.name: w.nbytes for w in liveness.weights}
    miss = page_cache.miss_fraction(liveness.weight_bytes, sizes)
    fractions = dict(page_cache.cached)
    in_place = choose_in_place(liveness, mappable, device_type="cpu", bypass_page_cache=False) if "in place" in ways else frozenset()
    in_place_sets = [in_place] + ([frozenset()] if in_place and miss > 0 else [])
    copies = [w for w in ("copy", "direct") if w in ways and (w == "copy" or miss > 0 or "copy" not in ways)]
    best: tuple[float, int, Plan] | None = None
    rank = 0
    for chosen in in_place_sets:
        for reads in copies:
            priced = _priced(cost_model, reads, miss)
            plan = schedule(without_in_place(liveness, chosen), budget_bytes, cost_model=priced, calls=calls,
                            alignment=alignment, margin_bytes=margin_bytes)
            plan = with_in_place(plan, liveness, chosen)
            # Faults on in-place pages: the first call reads what is not cached now, each call
            # what the page cache cannot keep; a kernel waits for each, so they add up.
            first_cold = sum(sizes[n] * (1.0 - fractions.get(n, 1.0)) for n in chosen)
            each_call = miss * sum(sizes[n] for n in chosen) / cost_model.disk_bytes_per_s
            plan = _with_faults(plan, reads, each_call, first_cold / cost_model.disk_bytes_per_s)
            p = plan.predicted
            total = p.first_call_seconds + (calls - 1) * p.seconds_per_call
            if best is None or total < best[0] * (1 - 1e-9):
                best = (total, rank, plan)
            rank += 1
    assert best is not None
    return best[2]


def _priced(cost_model: CostModel, reads: str, miss: float) -> CostModel:
    """The cost model a schedule of copies runs on: ``O_DIRECT`` moves bytes at the disk's rate with
    no core taken (nor slowed by the kernels); a buffered copy adds the disk's time for the share
    ``miss`` not cached, during which its core waits instead of copying."""
    if reads == "direct":
        return dataclasses.replace(cost_model, link_bytes_per_s=cost_model.disk_bytes_per_s, copy_interference=0.0,
                                   copy_slowdown=1.0)
    if miss <= 0:
        return cost_model
    copying = cost_model.copy_slowdown / cost_model.link_bytes_per_s
    per_byte = copying + miss / cost_model.disk_bytes_per_s
    return dataclasses.replace(
        cost_model,
        link_bytes_per_s=1.0 / per_byte,
        copy_interference=cost_model.copy_interference * copying / per_byte,
        copy_slowdown=1.0,
    )


def _with_faults(plan: Plan, reads: str, each_call_s: float, first_call_s: float) -> Plan:
    """``plan`` reading its copies by ``reads``, its prediction with the in-place page faults as
    stall (``each_call_s`` every call, ``first_call_s`` more on the first)."""
    p = plan.predicted
    predicted = dataclasses.replace(
        p,
        seconds_per_call=p.seconds_per_call + each_call_s,
        stall_seconds=p.stall_seconds + each_call_s,
        first_call_seconds=p.first_call_seconds + each_call_s + first_call_s,
    )
    return dataclasses.replace(plan, predicted=predicted, reads=reads)
