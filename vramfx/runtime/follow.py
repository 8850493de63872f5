"""Following a Plan without a graph: the module front end's steps, position by position.

A compiled graph runs its plan's steps as nodes. The module front end (layer swap, compile's
fallback, ``generate``) has no graph: when a module starts it calls :meth:`Follower.take` with the
position the recorded order gives it, and :meth:`Follower.give_back` when the module returns. The
follower runs the plan's steps up to that position on the engine — drops, fetches ahead, waits,
casts, in the plan's order, as a graph's nodes would — and hands out the views they provide.

A module not where the order predicts (``position=None``), or a step that would reuse memory a
running module still reads (the call nests its modules otherwise than the recorded one), leaves
the plan for the rest of the call: copies no running module reads are dropped, and every later
module is loaded synchronously through :meth:`Engine.load_now` — into free arena bytes, else memory
of its own within the room given, evicting kept weights no running module reads if it must.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.runtime.engine import Engine, Loaded


@dataclass
class Hold:
    """What one running module holds: the tensors it reads, and the engine memory behind them."""

    tensors: dict[str, torch.Tensor]
    transfers: frozenset[int] = frozenset()  # transfers whose arena bytes it reads while it runs
    cast_end: int | None = None  # its upcast slots are planned free from this position
    loaded: Loaded | None = None  # loaded off the plan


@dataclass
class CallCounts:
    """What one call moved and waited for.

    ``prefetched`` and ``synchronous`` count modules: those whose weights were fetched ahead, and
    those the call waited on from the start (loaded off the plan, or fetched at their wait).
    """

    fetched_bytes: int = 0
    prefetched: int = 0
    synchronous: int = 0
    wait_seconds: float = 0.0
    cast_bytes: int = 0


@dataclass
class _Position:
    """What the steps run so far in this call provide."""

    next_step: int = 0
    stored: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # name -> (view, transfer)
    cast: dict[str, tuple[torch.Tensor, int, int]] = field(default_factory=dict)  # name -> (view, end, transfer)
    fetched_at_wait: set[int] = field(default_factory=set)


class Follower:
    """Runs one engine's plan for a front end that calls modules, not graph nodes.

    Parameters
    ----------
    engine:
        The engine, for the plan it was made with (a plan with no steps loads every module off
        the plan).
    prefetch:
        Run fetches at their planned positions; ``False`` fetches each transfer at its wait.
    room_bytes:
        The most the engine may hold (``Engine.held_bytes``) when a load off the plan needs memory
        of its own; None for no limit.
    """

    def __init__(self, engine: Engine, *, prefetch: bool = True, room_bytes: int | None = None) -> None:
        self.engine = engine
        self.plan = engine.plan
        self.prefetch = prefetch
        self.room_bytes = room_bytes
        self.steps = self.plan.steps
        self.counts = CallCounts()
        self.holds: list[Hold] = []
        self.on_plan = False
        self._casts = {(c.name, c.position): k for k, c in enumerate(self.plan.casts)}
        self._bytes = {t.id: t.nbytes for t in self.plan.transfers}
        self._at = _Position()
        self._carried: set[int] = set()  # fetched at the end of the previous call, for this one

    # -- a call ----------------------------------------------------------------------------------
    def begin_call(self, *, on_plan: bool) -> None:
        """A call starts; ``on_plan``: its modules are expected in the order the plan was made for."""
        self.engine.activate()
        self.counts = CallCounts(fetched_bytes=sum(self._bytes[t] for t in self._carried))
        self._carried.clear()
        self._at = _Position()
        self.on_plan = on_plan

    def end_call(self, *, failed: bool = False) -> None:
        """The call is over: the plan's last steps run, and whatever is still fetched is dropped.
        A failed call's copies are waited out instead, so the next call starts clean."""
        if failed:
            self.engine.abort()
        else:
            if self.on_plan:
                self._advance(self.plan.num_positions)
            for t in self.engine.pending:
                self.engine.drop(t)
        self.on_plan = False
        self._at = _Position()

    def fetch_for_next_call(self) -> None:
        """Start the next call's first transfers now: nothing reads the arena between calls."""
        if not self.prefetch:
            return
        self.engine.activate()
        for step in self.steps:
            if step.position > 0:
                break
            if step.op == "fetch" and step.transfer not in self.engine.pending:
                self.engine.fetch(step.transfer)
                self._carried.add(step.transfer)

    # -- modules ---------------------------------------------------------------------------------
    def take(self, names: Sequence[str], position: int | None) -> Hold:
        """The weights ``names`` of a module starting at ``position`` of the plan's order (None: not
        where the order predicts), as the op reads them."""
        if position is not None and self.on_plan and self._advance(position):
            hold = self._from_plan(names, position)
        else:
            if self.on_plan:
                self._leave_plan()
            hold = self._load(names)
        self.holds.append(hold)
        return hold

    def give_back(self, hold: Hold, output: Any = None) -> Any:
        """The module returned ``output``: tensors of it that view engine memory get their own (those
        bytes are about to be reused); off the plan, its copies go."""
        self.holds.remove(hold)
        if hold.loaded is not None or hold.transfers or hold.cast_end is not None:
            output = _copy_out(output, self.engine)
        if hold.loaded is not None:
            self.engine.unload(hold.loaded)
        if not self.on_plan:
            for t in hold.transfers:
                if t in self.engine.pending and not self._read(t):
                    self._drop(t)
        return output

    # -- on the plan -----------------------------------------------------------------------------
    def _advance(self, position: int) -> bool:
        """Run the plan's steps up to ``position``; False, doing nothing more, when a step would reuse
        memory a running module still reads (a transfer due to be dropped, an upcast slot due to be
        reused)."""
        engine, at = self.engine, self._at
        if any(h.cast_end is not None and h.cast_end <= position for h in self.holds):
            return False
        while at.next_step < len(self.steps) and self.steps[at.next_step].position <= position:
            step = self.steps[at.next_step]
            if step.op == "drop":
                if self._read(step.transfer):
                    return False
                if step.transfer in engine.pending:
                    self._drop(step.transfer)
            elif step.op == "fetch":
                if self.prefetch and step.transfer not in engine.pending:
                    self._fetch(step.transfer)
            elif step.op == "wait":
                if step.transfer not in engine.pending:
                    self._fetch(step.transfer)
                    at.fetched_at_wait.add(step.transfer)
                start = time.perf_counter()
                views = engine.wait(step.transfer)
                self.counts.wait_seconds += time.perf_counter() - start
                for name, view in zip(step.names, views):
                    at.stored[name] = (view, step.transfer)
            else:
                (name,) = step.names
                index = self._casts[(name, step.position)]
                stored = at.stored[name][0] if step.transfer >= 0 else engine.resident(name)
                at.cast[name] = (engine.cast(index, stored), self.plan.casts[index].end, step.transfer)
                self.counts.cast_bytes += step.nbytes
            at.next_step += 1
        return True

    def _from_plan(self, names: Sequence[str], position: int) -> Hold:
        """What the steps provide for ``names`` at ``position``: casts, arena views, kept weights."""
        at = self._at
        tensors: dict[str, torch.Tensor] = {}
        reads: set[int] = set()  # transfers whose arena bytes the module reads
        through: set[int] = set()  # transfers its weights came through, cast or not
        cast_end = None
        for name in names:
            cast = at.cast.get(name)
            if cast is not None and cast[1] > position:
                tensors[name] = cast[0]
                cast_end = cast[1] if cast_end is None else max(cast_end, cast[1])
                through.add(cast[2])
            elif name in at.stored:
                tensors[name], t = at.stored[name]
                reads.add(t)
                through.add(t)
            else:
                tensors[name] = self.engine.resident(name)
        through.discard(-1)  # a cast of a kept weight
        if through & at.fetched_at_wait:
            self.counts.synchronous += 1
        elif through:
            self.counts.prefetched += 1
        return Hold(tensors, frozenset(reads), cast_end)

    def _fetch(self, transfer: int) -> None:
        self.engine.fetch(transfer)
        self.counts.fetched_bytes += self._bytes[transfer]

    def _drop(self, transfer: int) -> None:
        self.engine.drop(transfer)
        for name in [n for n, (_, t) in self._at.stored.items() if t == transfer]:
            del self._at.stored[name]

    def _read(self, transfer: int) -> bool:
        return any(transfer in h.transfers for h in self.holds)

    def _leave_plan(self) -> None:
        """The rest of the call is off the plan: copies no running module reads are dropped."""
        self.on_plan = False
        for t in self.engine.pending:
            if not self._read(t):
                self._drop(t)

    # -- off the plan ----------------------------------------------------------------------------
    def _load(self, names: Sequence[str]) -> Hold:
        """Load ``names`` now: into free arena bytes, else memory of its own within the room (the
        arena is freed for it when empty, and kept weights no running module reads are evicted;
        the next call's activation loads them again)."""
        if not names:
            return Hold({})
        engine = self.engine
        start = time.perf_counter()
        loaded = engine.load_now(names, own_memory=False)
        if loaded is None:
            need = engine.load_bytes(names)
            if self.room_bytes is not None and engine.held_bytes + need > self.room_bytes:
                engine.release_arena()
                self._evict(self.room_bytes - need, keep=set(names))
            loaded = engine.load_now(names)
        assert loaded is not None
        self.counts.wait_seconds += time.perf_counter() - start
        self.counts.fetched_bytes += loaded.stored_bytes
        self.counts.cast_bytes += loaded.cast_bytes
        self.counts.synchronous += 1
        return Hold(dict(zip(names, loaded.tensors)), loaded=loaded)

    def _evict(self, room: int, *, keep: set[str]) -> None:
        """Drop kept weights, last kept first, that no running module reads, until the engine holds
        at most ``room`` bytes."""
        keep = keep | {name for h in self.holds for name in h.tensors}
        for name in reversed(self.plan.resident):
            if self.engine.held_bytes <= room:
                break
            if name not in keep:
                self.engine.store.drop(name)


def _copy_out(output: Any, engine: Engine) -> Any:
    """Outputs that view the engine's memory (a module returning its weight) get their own."""
    if not any(isinstance(t, torch.Tensor) and engine.owns(t) for t in pytree.tree_leaves(output)):
        return output
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if engine.owns(t) else t, output)
