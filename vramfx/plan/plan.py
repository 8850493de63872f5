"""The Plan: a frozen, serialisable record of one schedule and its predictions.

A Plan is plain data. It can be printed, saved, compared and checked without a model. The rewrite
stage turns it into graph nodes; the runtime follows it.

Positions are those of :class:`vramfx.plan.types.Liveness`. A step "at position ``p``" runs
right before the node at ``p`` (``p == num_positions`` means after the last node). At one
position, drops run first, then fetches, then waits, then casts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vramfx.util import align_up, ALIGNMENT, format_bytes, format_seconds  # noqa: F401 (re-exported)

STEP_ORDER = {"drop": 0, "fetch": 1, "wait": 2, "cast": 3}

@dataclass(frozen=True)
class PlannedWeight:
    """A weight the plan moves or keeps: its size and how the runtime views its bytes.

    ``dtype`` is the dtype it is stored and moved in; ``compute_dtype`` the one the graph reads
    it in, when a cast turns one into the other (``None`` when there is no cast). ``format`` names
    the stored format when the cast decodes (``"Q4_K"``): the weight is then moved and held as a
    flat run of ``nbytes`` in ``dtype``.
    """

    name: str
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    compute_dtype: str | None = None
    format: str | None = None

    @property
    def stored_as(self) -> str:
        """The stored format, or the dtype when there is none: how plans show a weight's bytes."""
        return self.format or self.dtype


@dataclass(frozen=True)
class Cast:
    """A weight cast from its storage dtype to its compute dtype for one span of its uses.

    The cast runs right before the node at ``position`` (after the wait that brings the weight
    there) and writes ``nbytes`` at ``offset`` of the upcast region, which it holds over
    ``[position, end)``, half-open.
    """

    name: str
    position: int
    end: int
    nbytes: int
    offset: int = 0


@dataclass(frozen=True)
class Transfer:
    """One fetch of a group of weights into the arena, and its lifetime there.

    The arena bytes of member ``i`` are ``[offsets[i], offsets[i] + sizes[i])``; they are
    reserved from ``fetch`` to ``drop``, half-open. ``wait`` is the first position that reads
    a member, so ``fetch <= wait < drop``.
    """

    id: int
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    fetch: int
    wait: int
    drop: int

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class Step:
    """One runtime step: ``op`` is ``fetch``, ``wait``, ``drop`` or ``cast``.

    A cast names the transfer whose copy of the weight it reads, or ``-1`` for a resident weight.
    """

    op: str
    position: int
    transfer: int
    names: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects one call to take, in seconds."""

    seconds_per_call: float
    stall_seconds: float
    compute_seconds: float
    transfer_seconds: float
    first_call_seconds: float


@dataclass(frozen=True)
class Plan:
    """A schedule of resident and streamed weights under a byte budget.

    ``peak_bytes = resident_bytes + arena_bytes + upcast_bytes + activation_peak_bytes +
    workspace_bytes``; the arena and the upcast region are allocated whole, so all of them count
    at every position. ``streamed_bytes`` is what a steady-state call fetches;
    ``resident_bytes`` is loaded once. Weights stored in a low dtype count in it; ``casts`` turn
    them into their compute dtype per span of uses, in static slots of the upcast region.

    ``in_place`` are resident weights used where they lie in a mapping of their file (CPU, page
    cache): they take no budget bytes (``nbytes`` 0 in ``weights``) and are never copied;
    ``in_place_bytes`` is their size in the file (:mod:`vramfx.plan.in_place`). ``reads`` says
    how the other weights are read from files: ``"copy"`` through the page cache, ``"direct"``
    with ``O_DIRECT`` (:mod:`vramfx.plan.reads`).
    """

    budget_bytes: int
    peak_bytes: int
    resident_bytes: int
    streamed_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    workspace_bytes: int
    arena_bytes: int
    alignment: int
    num_positions: int
    calls: int
    resident: tuple[str, ...]
    transfers: tuple[Transfer, ...]
    weights: tuple[PlannedWeight, ...]
    predicted: Prediction
    cost_model: dict[str, float] = field(default_factory=dict)
    position_names: tuple[str, ...] = ()
    casts: tuple[Cast, ...] = ()
    upcast_bytes: int = 0
    in_place: tuple[str, ...] = ()
    in_place_bytes: int = 0
    reads: str = "copy"

    @property
    def name_to_weight(self) -> dict[str, PlannedWeight]:
        return {w.name: w for w in self.weights}

    @classmethod
    def empty(cls, arena_bytes: int = 0, *, alignment: int, budget_bytes: int = 0) -> "Plan":
        """A plan that fetches, keeps and casts nothing: an engine for loads off the plan only.

        Examples
        --------
        >>> Plan.empty(4096, alignment=64).steps
        ()
        """
        return cls(
            budget_bytes=budget_bytes, peak_bytes=arena_bytes, resident_bytes=0, streamed_bytes=0, weight_bytes=0,
            activation_peak_bytes=0, workspace_bytes=0, arena_bytes=arena_bytes, alignment=alignment,
            num_positions=0, calls=1, resident=(), transfers=(), weights=(),
            predicted=Prediction(0.0, 0.0, 0.0, 0.0, 0.0),
        )

    @property
    def cast_bytes(self) -> int:
        """Bytes the casts of one call write in compute dtypes."""
        return sum(c.nbytes for c in self.casts)

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every fetch, wait, drop and cast in execution order."""
        steps = []
        holders: dict[str, list[Transfer]] = {}
        for tr in self.transfers:
            for op, position in (("fetch", tr.fetch), ("wait", tr.wait), ("drop", tr.drop)):
                steps.append(Step(op, position, tr.id, tr.names, tr.nbytes))
            for name in tr.names:
                holders.setdefault(name, []).append(tr)
        for c in self.casts:
            holder = next((t.id for t in holders.get(c.name, ()) if t.wait <= c.position < t.drop), -1)
            steps.append(Step("cast", c.position, holder, (c.name,), c.nbytes))
        steps.sort(key=lambda s: (s.position, STEP_ORDER[s.op], s.transfer, s.names))
        return tuple(steps)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [asdict(s) for s in self.steps]
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self, *, largest: int = 5) -> str:
        """A few lines for humans: memory, predicted time, and the largest transfers.

        Parameters
        ----------
        largest:
            How many of the largest transfers to list.

        Returns
        -------
        str
            Multi-line text, no trailing newline.
        """
        b, sec = format_bytes, format_seconds
        p = self.predicted
        share = f" ({100.0 * self.peak_bytes / self.budget_bytes:.1f}% of budget)" if self.budget_bytes else ""
        lines = [
            f"budget        {b(self.budget_bytes)}",
            f"planned peak  {b(self.peak_bytes)}{share}",
            f"  resident    {b(self.resident_bytes)} in {len(self.resident)} weights",
            f"  arena       {b(self.arena_bytes)}",
            *([f"  upcasts     {b(self.upcast_bytes)} (cast buffers)"] if self.casts else []),
            f"  activations {b(self.activation_peak_bytes)} (peak)",
            f"  workspace   {b(self.workspace_bytes)}",
            f"weights       {b(self.weight_bytes)} in {len(self.weights)} tensors",
            *([f"  in place    {b(self.in_place_bytes)} in {len(self.in_place)} weights (mapped file pages, "
               "outside the budget)"] if self.in_place else []),
            f"streamed      {b(self.streamed_bytes)} per call in {len(self.transfers)} transfers "
            f"({len(self.steps)} steps over {self.num_positions} positions)"
            + (", read with O_DIRECT" if self.reads == "direct" else ""),
            *self._cast_lines(),
            f"predicted     {sec(p.seconds_per_call)} per call: compute "
            f"{sec(p.compute_seconds)}, stall {sec(p.stall_seconds)}, copy engine busy "
            f"{sec(p.transfer_seconds)}",
            f"first call    {sec(p.first_call_seconds)} (loads the resident weights); "
            f"planned for {self.calls} call{'s' if self.calls != 1 else ''}",
        ]
        top = sorted(self.transfers, key=lambda t: (-t.nbytes, t.id))[:largest]
        if top:
            lines.append("largest transfers:")
            for t in top:
                shown = ", ".join(t.names[:3])
                if len(t.names) > 3:
                    shown += f", +{len(t.names) - 3} more"
                lines.append(
                    f"  #{t.id:<5} {b(t.nbytes):>10}  fetch@{t.fetch} wait@{t.wait} "
                    f"drop@{t.drop}  {shown}"
                )
        return "\n".join(lines)

    def _cast_lines(self) -> list[str]:
        """The summary's line on low-precision storage; none without casts."""
        if not self.casts:
            return []
        pairs = sorted({(w.stored_as, w.compute_dtype) for w in self.weights if w.compute_dtype})
        shown = ", ".join(f"{s} -> {c}" for s, c in pairs)
        low = sum(1 for w in self.weights if w.compute_dtype)
        decoded = sum(1 for w in self.weights if w.format)
        what = f"{low} weights stored low" + (f", {decoded} of them decoded" if decoded else "")
        return [
            f"casts         {len(self.casts)} per call ({shown}) of {what}, "
            f"{format_bytes(self.cast_bytes)} written"
        ]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        data = dict(data)
        data.pop("steps", None)
        data["resident"] = tuple(data["resident"])
        data["transfers"] = tuple(
            Transfer(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
            for t in data["transfers"]
        )
        data["weights"] = tuple(
            PlannedWeight(w["name"], w["nbytes"], tuple(w["shape"]), w["dtype"], w.get("compute_dtype"), w.get("format"))
            for w in data["weights"]
        )
        data["casts"] = tuple(Cast(**c) for c in data.get("casts", ()))
        data["predicted"] = Prediction(**data["predicted"])
        data["position_names"] = tuple(data.get("position_names", ()))
        data["in_place"] = tuple(data.get("in_place", ()))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
