"""A persistent cache of plans: a new process planning the same graph under the same settings
reads the :class:`~vramfx.plan.plan.Plan` from disk instead of scheduling it again.

A plan is a pure function of what the scheduler reads, so that is the key: the whole
:class:`~vramfx.plan.types.Liveness` (every weight's name, stored size, dtype, format, uses and
spans, the activation profile, per-node FLOPs, bytes and op classes: the captured graph and the
weights' storage facts as the planner sees them), the budget, the cost model (all its rates and
fixed costs), ``calls``, the alignment, the margin (which holds the graph's host memory and the
allocator's slack on CPU), the weights used in place (on CPU: what the choice of reads depends on, the
ways allowed, the weights that can be mapped, the share read from disk at every call and the cached
fractions), and vramfx's version and source hash.
Nothing a plan depends on is left out of the key, so an entry is never stale; the liveness is
computed in each process, and only the schedule is skipped.

Entries live beside the capture cache (``<cache dir>/plans/``, :func:`vramfx.capture_cache.cache_dir`)
and follow its rules: the same switch (``VRAMFX_CACHE=0``, ``cache=False``, ``vramfx plan
--no-cache``), atomic writes, and an unreadable entry is a miss, logged at debug level and
replaced.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import sys
from collections.abc import Collection
from pathlib import Path

from vramfx.capture_cache import cache_dir, cache_enabled, vramfx_version, write_atomically
from vramfx.plan.costs import CostModel
from vramfx.plan.in_place import with_in_place, without_in_place
from vramfx.plan.plan import Plan
from vramfx.plan.reads import PageCacheState, schedule_reads
from vramfx.plan.schedule import schedule
from vramfx.plan.types import Liveness

log = logging.getLogger(__name__)

#: Bumped whenever the entry layout changes.
PLAN_CACHE_FORMAT = 2
_MAGIC = b"vramfx-plan\n"


def cached_plan(
    liveness: Liveness,
    budget_bytes: int,
    *,
    cost_model: CostModel,
    calls: int,
    alignment: int,
    margin_bytes: int,
    in_place: Collection[str] = frozenset(),
    ways: Collection[str] | None = None,
    mappable: Collection[str] = frozenset(),
    page_cache: PageCacheState | None = None,
    cache: bool | None = None,
) -> Plan:
    """``schedule`` of ``liveness`` without the weights used ``in_place``, with them added back
    (:func:`vramfx.plan.in_place.with_in_place`); read from the cache when planned before.

    Parameters
    ----------
    liveness, budget_bytes, cost_model, calls, alignment, margin_bytes:
        As :func:`vramfx.plan.schedule.schedule`.
    in_place:
        Weights used where they lie in their file, outside the budget.
    ways, mappable, page_cache:
        On CPU, instead of ``in_place``: the plan chooses how weights are read, by
        :func:`vramfx.plan.reads.schedule_reads` with these; the key holds what it reads of
        ``page_cache`` (the share read from disk at every call, the cached fractions).
    cache:
        ``False`` plans without the cache; ``None`` follows ``VRAMFX_CACHE``.

    Raises
    ------
    BudgetError
        No schedule fits; nothing is cached.
    """
    in_place = frozenset(in_place)
    state = page_cache if page_cache is not None else PageCacheState()

    def plan_now() -> Plan:
        if ways is not None:
            return schedule_reads(liveness, budget_bytes, cost_model=cost_model, calls=calls, alignment=alignment,
                                  margin_bytes=margin_bytes, mappable=mappable, page_cache=state, ways=ways)
        scheduled = schedule(without_in_place(liveness, in_place), budget_bytes, cost_model=cost_model, calls=calls,
                             alignment=alignment, margin_bytes=margin_bytes)
        return with_in_place(scheduled, liveness, in_place)

    if not cache_enabled(cache):
        return plan_now()
    reads = None
    if ways is not None:
        sizes = {w.name: w.nbytes for w in liveness.weights}
        reads = (tuple(sorted(ways)), tuple(sorted(mappable)), state.miss_fraction(liveness.weight_bytes, sizes),
                 state.cached)
    key = plan_key(liveness, budget_bytes, cost_model=cost_model, calls=calls, alignment=alignment,
                   margin_bytes=margin_bytes, in_place=in_place, reads=reads)
    path = cache_dir() / "plans" / f"{key}.pkl"
    found = _load(path, key)
    if found is not None:
        log.debug("vramfx: plan read from %s", path)
        return found
    plan = plan_now()
    try:
        write_atomically(path, lambda f: (f.write(_MAGIC), pickle.dump((key, plan), f, protocol=pickle.HIGHEST_PROTOCOL)))
    except Exception as exc:  # a cache that cannot be written costs the next process a schedule, nothing else
        log.debug("vramfx: plan not cached: %s: %s", type(exc).__name__, exc)
    return plan


def plan_key(
    liveness: Liveness,
    budget_bytes: int,
    *,
    cost_model: CostModel,
    calls: int,
    alignment: int,
    margin_bytes: int,
    in_place: Collection[str],
    reads: object = None,
) -> str:
    """A hex digest of everything a plan depends on (module doc)."""
    parts = (
        PLAN_CACHE_FORMAT,
        sys.version,
        vramfx_version(),
        repr(liveness),
        budget_bytes,
        repr(cost_model),
        calls,
        alignment,
        margin_bytes,
        tuple(sorted(in_place)),
        reads,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _load(path: Path, key: str) -> Plan | None:
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not a vramfx plan entry")
            stored_key, plan = pickle.load(f)
        if stored_key != key or not isinstance(plan, Plan):
            raise ValueError("the entry's key differs from its file name")
        return plan
    except FileNotFoundError:
        return None
    except Exception as exc:  # any unreadable entry is a miss; planning writes a good one over it
        log.debug("vramfx: ignoring unreadable plan cache entry %s: %s: %s", path, type(exc).__name__, exc)
        return None
