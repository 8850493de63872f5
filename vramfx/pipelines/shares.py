"""How one budget is shared by the units of a pipeline, which run one at a time.

While a unit runs, the others hold only what they keep between their calls: the host memory of
their captured graphs (on CPU), and, for a unit *kept* across generations, its resident
weights. So each unit may use the budget less those, less the pipeline's own tensors (prompt
embeddings, latents, the decoded image) that live between units. Pure functions over plain
numbers: the pipeline asks the planner for predictions through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitCost:
    """What one unit weighs in the keep decision.

    ``calls`` per generation; ``graph_bytes`` its graphs' host memory; ``kept_bytes`` what it
    would hold between generations if kept (``None``: it cannot be kept, because its plan
    streams weights); ``reload_seconds`` what a generation pays to load those bytes again when
    it is not kept.
    """

    name: str
    calls: int
    graph_bytes: int = 0
    kept_bytes: int | None = None
    reload_seconds: float = 0.0


def reserve_bytes(name: str, units: Sequence[UnitCost], kept: frozenset[str], tensor_bytes: int) -> int:
    """Bytes unit ``name`` leaves to the rest of the pipeline while it runs.

    Examples
    --------
    >>> units = [UnitCost("te", 1, 100, 40), UnitCost("dit", 20, 300)]
    >>> reserve_bytes("dit", units, frozenset({"te"}), 10)  # te's graph and kept weights, tensors
    150
    >>> reserve_bytes("te", units, frozenset({"te"}), 10)
    310
    """
    held = 0
    for unit in units:
        if unit.name != name:
            held += unit.graph_bytes + ((unit.kept_bytes or 0) if unit.name in kept else 0)
    return held + tensor_bytes


def choose_kept(
    units: Sequence[UnitCost],
    seconds_per_call: Callable[[str, int], float | None],
    tensor_bytes: int = 0,
) -> frozenset[str]:
    """The units whose resident weights stay between generations, chosen by cost.

    Keeping a unit saves its ``reload_seconds`` every generation and costs every other unit the
    bytes it keeps: they may stream more on each of their calls. ``seconds_per_call(name,
    reserve)`` is the planner's predicted time per call of unit ``name`` when it leaves
    ``reserve`` bytes to the others (``None`` when it no longer fits). Candidates are tried
    best saving per kept byte first; one is kept when every unit still fits and the added
    time of all calls of one generation is less than what it saves.

    Examples
    --------
    Keeping the 40-byte encoder costs the transformer nothing while its budget has room:

    >>> units = [UnitCost("te", 1, 0, 40, reload_seconds=0.5), UnitCost("dit", 20, 0)]
    >>> choose_kept(units, lambda name, reserve: 1.0)
    frozenset({'te'})
    >>> choose_kept(units, lambda name, reserve: 1.0 + reserve / 1000)  # 20 calls x 0.04 s > 0.5 s
    frozenset()
    """
    kept: frozenset[str] = frozenset()
    candidates = [u for u in units if u.kept_bytes is not None and u.reload_seconds > 0]
    candidates.sort(key=lambda u: (-u.reload_seconds / max(u.kept_bytes or 1, 1), u.name))
    for candidate in candidates:
        trial = kept | {candidate.name}
        added = 0.0
        for unit in units:
            before = seconds_per_call(unit.name, reserve_bytes(unit.name, units, kept, tensor_bytes))
            after = seconds_per_call(unit.name, reserve_bytes(unit.name, units, trial, tensor_bytes))
            if before is None or after is None:
                added = float("inf")
                break
            added += unit.calls * (after - before)
        if added < candidate.reload_seconds:
            kept = trial
    return kept


def pipeline_minimum(minimums: Mapping[str, int]) -> int:
    """The smallest budget the whole pipeline plans under, when nothing is kept: units run one
    at a time, so the largest of their minimums (each already counting what the others hold).

    >>> pipeline_minimum({"te": 100, "dit": 300})
    300
    """
    return max(minimums.values(), default=0)
