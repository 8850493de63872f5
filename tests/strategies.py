"""Hypothesis strategies and small builders for planner inputs (Liveness records).

A plain module the tests import (``from strategies import ...``); nothing here runs torch.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from vramfx.plan.costs import CostModel
from vramfx.plan.types import Liveness, WeightLife

#: One byte per microsecond on the link, one MFLOP per millisecond, no fixed costs: hand-made
#: cases can be reasoned about in round numbers.
UNIT_COSTS = CostModel(
    compute_flops_per_s=1e9,
    memory_bytes_per_s=1e9,
    link_bytes_per_s=1e6,
    link_latency_s=0.0,
    node_overhead_s=0.0,
)


def weight(
    name: str, nbytes: int, *uses: int, spans: tuple[tuple[int, int], ...] | None = None
) -> WeightLife:
    """A WeightLife read at ``uses``; by default each use is its own one-position span."""
    ordered = tuple(sorted(uses))
    if spans is None:
        spans = tuple((u, u + 1) for u in ordered)
    return WeightLife(name, nbytes, ordered, tuple(spans), shape=(nbytes,), dtype="uint8")


def liveness(
    num_positions: int,
    weights: list[WeightLife] | tuple[WeightLife, ...],
    *,
    activations: int | list[int] = 0,
    flops: float | list[float] = 0.0,
    workspace_bytes: int = 0,
) -> Liveness:
    """A Liveness over ``num_positions`` nodes; scalars broadcast to every position."""

    def per_position(value: object) -> tuple:
        if isinstance(value, (list, tuple)):
            assert len(value) == num_positions
            return tuple(value)
        return (value,) * num_positions

    ordered = sorted(weights, key=lambda w: w.uses[0] if w.uses else num_positions)
    return Liveness(
        num_positions=num_positions,
        weights=tuple(ordered),
        activation_bytes=per_position(activations),
        flops=tuple(float(f) for f in per_position(flops)),
        memory_bytes=(0,) * num_positions,
        workspace_bytes=workspace_bytes,
        position_names=tuple(f"node{t}" for t in range(num_positions)),
    )


# ---------------------------------------------------------------------------------------------
# Strategies

nbytes_values = st.one_of(
    st.just(0),
    st.integers(1, 100),  # tiny: norms, biases
    st.integers(100, 20_000),
    st.integers(20_000, 2_000_000),  # large: matmul weights
)


@st.composite
def weight_lives(draw: st.DrawFn, name: str, num_positions: int) -> WeightLife:
    """One weight: random size, random uses, spans that group runs of uses (views)."""
    nbytes = draw(nbytes_values)
    if draw(st.integers(0, 29)) == 0:
        return WeightLife(name, nbytes, (), (), (nbytes,), "uint8")  # never read
    uses = sorted(
        draw(st.sets(st.integers(0, num_positions - 1), min_size=1, max_size=min(6, num_positions)))
    )
    spans = []
    begin = uses[0]
    for previous, u in zip(uses, uses[1:]):
        # A view taken at ``begin`` and read again at ``u`` keeps the span open.
        if not draw(st.booleans()):
            spans.append((begin, previous + 1))
            begin = u
    spans.append((begin, uses[-1] + 1))
    return WeightLife(name, nbytes, tuple(uses), tuple(spans), (nbytes,), "uint8")


@st.composite
def livenesses(
    draw: st.DrawFn, max_positions: int = 40, max_weights: int = 12
) -> Liveness:
    """A random Liveness: positions, weights, activation profile, FLOPs and memory traffic."""
    num_positions = draw(st.integers(1, max_positions))
    count = draw(st.integers(0, max_weights))
    weights = [draw(weight_lives(f"w{i}", num_positions)) for i in range(count)]
    weights.sort(key=lambda w: w.uses[0] if w.uses else num_positions)
    per_position = st.lists(
        st.integers(0, 50_000), min_size=num_positions, max_size=num_positions
    )
    flops = draw(
        st.lists(
            st.sampled_from([0.0, 1e3, 1e6, 1e7, 1e8, 1e9]),
            min_size=num_positions,
            max_size=num_positions,
        )
    )
    return Liveness(
        num_positions=num_positions,
        weights=tuple(weights),
        activation_bytes=tuple(draw(per_position)),
        flops=tuple(flops),
        memory_bytes=tuple(draw(per_position)),
        workspace_bytes=draw(st.sampled_from([0, 0, 64, 10_000])),
        position_names=tuple(f"n{t}" for t in range(num_positions)),
    )


cost_models = st.builds(
    CostModel,
    compute_flops_per_s=st.sampled_from([1e9, 5e10, 1e14]),
    memory_bytes_per_s=st.sampled_from([1e9, 1e10, 2e12]),
    link_bytes_per_s=st.sampled_from([1e6, 1e8, 4e9, 2e10]),
    link_latency_s=st.sampled_from([0.0, 1e-5, 1e-3]),
    node_overhead_s=st.sampled_from([0.0, 5e-6]),
)

#: Keyword arguments of ``schedule`` other than the budget and cost model.
schedule_knobs = st.fixed_dictionaries(
    {
        "alignment": st.sampled_from([1, 8, 64, 256]),
        "margin_bytes": st.sampled_from([0, 0, 100]),
        "coalesce_bytes": st.sampled_from([0, 256, 4096, 65_536, 4 * 2**20]),
        "coalesce_positions": st.sampled_from([0, 2, 8, 64]),
    }
)


def everything_fits(lv: Liveness, alignment: int, margin_bytes: int) -> int:
    """A budget that holds every weight resident at once, plus activations and workspace."""
    weights = sum(-(-w.nbytes // alignment) * alignment for w in lv.weights)
    return weights + lv.activation_peak_bytes + lv.workspace_bytes + margin_bytes


def stored_low(lv, names, factor: int = 4):
    """``lv`` with ``names`` stored in a dtype ``factor`` times narrower than the graph reads them in."""
    weights = tuple(
        dataclasses.replace(w, compute_dtype="float32", compute_nbytes=factor * w.nbytes) if w.name in names else w
        for w in lv.weights
    )
    return dataclasses.replace(lv, weights=weights)
