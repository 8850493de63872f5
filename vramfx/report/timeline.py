"""One steady-state call replayed from a plan: when each node and copy runs, and memory in use.

The scheduler predicts a call with a two-resource model (compute, and one copy engine that takes
transfers in order); a Plan keeps only the totals. Traces and plots need the detail, so this
module replays the plan through the scheduler's own simulation
(:func:`vramfx.plan.simulate.simulate_copies`) with the cost model the plan was made with and the
per-node FLOPs and bytes of its liveness: its total equals ``plan.predicted.seconds_per_call``.
"""

from __future__ import annotations

from itertools import accumulate
from dataclasses import dataclass

from vramfx.plan.costs import CostModel, priced_node_seconds
from vramfx.plan.plan import Plan
from vramfx.plan.simulate import simulate_copies
from vramfx.plan.types import Liveness


@dataclass(frozen=True)
class Timeline:
    """Predicted times of one steady-state call, in seconds from its start.

    Attributes
    ----------
    node_start, node_seconds:
        Per position: when its node starts and how long it runs.
    stall_seconds:
        Per position: how long compute waits, right before the node, for transfers whose
        ``wait`` is there.
    copy_start, copy_seconds:
        Per transfer, in ``plan.transfers`` order: when its copy starts on the copy engine and
        how long it takes.
    interference_seconds:
        Compute lost to copies running beside it (``copy_interference`` × copy time). The cost
        model charges it to the call as a whole; the timeline puts it at the end.
    seconds:
        The whole call: the last node's end plus the interference.
    """

    node_start: tuple[float, ...]
    node_seconds: tuple[float, ...]
    stall_seconds: tuple[float, ...]
    copy_start: tuple[float, ...]
    copy_seconds: tuple[float, ...]
    interference_seconds: float
    seconds: float

    @property
    def compute_end(self) -> float:
        """When the last node ends, before the interference is added."""
        return self.seconds - self.interference_seconds


@dataclass(frozen=True)
class MemoryProfile:
    """Device memory at each position under the plan's memory model, in bytes.

    ``streamed[t]`` is what the arena holds while node ``t`` runs: transfers fetched and not yet
    dropped (``fetch <= t < drop``), in flight or in use. The arena and the upcast region (casts
    of weights stored in a low dtype) are allocated whole, so ``resident + arena + upcast +
    activations[t] + workspace`` is what the device holds at ``t``, and its maximum is
    ``plan.peak_bytes``.
    """

    resident: int
    arena: int
    workspace: int
    streamed: tuple[int, ...]
    activations: tuple[int, ...]
    upcast: int = 0

    def in_use(self, position: int) -> int:
        """Bytes the device holds while node ``position`` runs."""
        return self.resident + self.arena + self.upcast + self.activations[position] + self.workspace


def predict_timeline(plan: Plan, liveness: Liveness) -> Timeline:
    """Replay one steady-state call of ``plan`` with the cost model it was made with.

    Fetches at a position are issued when compute reaches it (the node before has finished);
    the copy engine runs them one after another in plan order. Before a node runs, compute
    waits for every transfer whose ``wait`` is that position.

    Parameters
    ----------
    plan:
        A plan made from ``liveness``.
    liveness:
        Supplies each node's FLOPs and bytes.

    Returns
    -------
    Timeline

    Examples
    --------
    >>> timeline = predict_timeline(plan, liveness)  # doctest: +SKIP
    >>> abs(timeline.seconds - plan.predicted.seconds_per_call) < 1e-9  # doctest: +SKIP
    True
    """
    _check_matches(plan, liveness)
    cost_model = CostModel.from_dict(plan.cost_model)
    node_seconds = priced_node_seconds(liveness, cost_model)
    copy_seconds = [cost_model.transfer_seconds(t.nbytes) for t in plan.transfers]
    transfers = sorted(range(len(plan.transfers)), key=lambda i: (plan.transfers[i].fetch, i))
    times = simulate_copies(
        [plan.transfers[i].fetch for i in transfers],
        [plan.transfers[i].wait for i in transfers],
        [copy_seconds[i] for i in transfers],
        [0.0, *accumulate(node_seconds)],
    )
    stall = [0.0] * liveness.num_positions
    copy_start = [0.0] * len(plan.transfers)
    for k, i in enumerate(transfers):
        stall[plan.transfers[i].wait] += times.stall[k]
        copy_start[i] = times.start[k]
    node_start, now = [], 0.0
    for position, seconds in enumerate(node_seconds):
        now += stall[position]
        node_start.append(now)
        now += seconds
    interference = cost_model.copy_interference * sum(copy_seconds)
    return Timeline(
        node_start=tuple(node_start),
        node_seconds=tuple(node_seconds),
        stall_seconds=tuple(stall),
        copy_start=tuple(copy_start),
        copy_seconds=tuple(copy_seconds),
        interference_seconds=interference,
        seconds=times.compute_end + interference,
    )


def memory_profile(plan: Plan, liveness: Liveness) -> MemoryProfile:
    """Resident, streamed, activation and workspace bytes at each position of ``plan``.

    Parameters
    ----------
    plan:
        A plan made from ``liveness``.
    liveness:
        Supplies the activation bytes at each position.

    Returns
    -------
    MemoryProfile
    """
    _check_matches(plan, liveness)
    num_positions = liveness.num_positions
    # Half-open [fetch, drop) lifetimes summed by a difference array.
    delta = [0] * (num_positions + 1)
    for transfer in plan.transfers:
        delta[transfer.fetch] += transfer.nbytes
        delta[transfer.drop] -= transfer.nbytes
    streamed, running = [], 0
    for position in range(num_positions):
        running += delta[position]
        streamed.append(running)
    return MemoryProfile(
        resident=plan.resident_bytes,
        arena=plan.arena_bytes,
        workspace=plan.workspace_bytes,
        streamed=tuple(streamed),
        activations=tuple(liveness.activation_bytes),
        upcast=plan.upcast_bytes,
    )


def _check_matches(plan: Plan, liveness: Liveness) -> None:
    """A plan replayed against another graph's liveness would give nonsense, not an error."""
    if plan.num_positions != liveness.num_positions:
        raise ValueError(
            f"the plan has {plan.num_positions} positions but the liveness has "
            f"{liveness.num_positions}; pass the liveness the plan was made from"
        )
