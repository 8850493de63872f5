"""Where a pass over the model begins and ends when no forward of the model marks it.

Pipelines often drive a model without calling its ``forward``: a function calls the blocks one by
one (``model_fn(dit=...)``), and the layer-swap runtime then sees only the wrapped modules being
called, one after another, pass after pass. A *pass* is what the runtime records, plans for and
follows; here it is found from the calls themselves.

The stream is cut into *items*, one per top-level module call (a call made while no other wrapped
module runs): the module and, in order, every wrapped module it called, with how many positions
each spanned. Then:

- **The recording pass** starts at the first wrapped module called and ends when that module
  (its *opener*) is called again at the top level. Its order is followed from then on.
- **A recorded order** is confirmed when the stream repeats it: a pass that follows it to its last
  position ends there (and the next pass's first weights are fetched right away); a pass that
  leaves it ends when its opener is called again where the order does not expect it.
- **A different order** is adopted only once the stream shows it twice in a row (:func:`period`:
  the shortest block the latest items repeat, at least twice from where the stream began, or three
  times after a prefix that never comes back). So an opener called twice in one pass, passes that
  alternate (a cache that skips blocks every other step) or a module called once before the loop
  end up as one longer order, not as orders replanned on every pass.

Every guess only decides what is fetched ahead: a module not where the followed order predicts is
loaded synchronously, as it would be with no plan, so a wrong guess is slower, never wrong.

Examples
--------
>>> a, b, c = ((0, 1),), ((1, 1),), ((2, 1),)
>>> period([a, b, a, c, a, b, a, c])
(0, 4)
>>> period([c, a, b, a, b, a, b])  # a prefix that never comes back, then three repetitions
(1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vramfx.swap.record import CallRecord

#: One top-level module call: ``(unit index, positions spanned)`` for it and each unit it called.
Item = tuple[tuple[int, int], ...]

#: Items kept while no order is confirmed, per item of the order followed (and at least this many).
_HISTORY_PER_ITEM = 8
_HISTORY_MIN = 256


def items_of(record: CallRecord) -> list[Item]:
    """The top-level items of a recorded pass, in order."""
    items, p, n = [], 0, len(record.order)
    while p < n:
        end = max(record.ends[p], p + 1)
        items.append(tuple((record.order[q], max(record.ends[q], q + 1) - q) for q in range(p, end)))
        p = end
    return items


def record_of(items: Sequence[Item], unit_flops: dict[int, float]) -> CallRecord:
    """The CallRecord of a pass made of ``items``; each position costs its unit's counted FLOPs."""
    record = CallRecord()
    for item in items:
        start = len(record.order)
        for offset, (unit, span) in enumerate(item):
            record.order.append(unit)
            record.ends.append(start + offset + span)
            record.flops.append(unit_flops.get(unit, 0.0))
    return record


def period(items: Sequence[Item]) -> tuple[int, int] | None:
    """``(start, length)`` of the block the stream ``items`` ends by repeating, or None.

    ``items[start:]`` is whole repetitions of ``items[start:start + length]``: at least two when
    ``start`` is 0, at least three after a prefix (a prefix must not be mistaken for part of the
    block, and a module called twice in a row must not be mistaken for a pass). The shortest such
    block is chosen, then the earliest start.
    """
    n = len(items)
    for length in range(1, n // 2 + 1):
        if items[n - 1] != items[n - 1 - length] or items[n - 2 * length : n - length] != items[n - length : n]:
            continue
        start = n - 2 * length
        while start > 0 and items[start - 1] == items[start - 1 + length]:
            start -= 1
        start += (n - start) % length  # whole repetitions only: the stream ends at a block's end
        repetitions = (n - start) // length
        if repetitions >= (2 if start == 0 else 3):
            return start, length
    return None


@dataclass
class PassFinder:
    """Which order the runtime follows, learnt from the stream of passes it sees.

    ``followed`` is the order followed (its items), None before the first pass ended; ``history``
    the items seen since it was last confirmed.
    """

    followed: list[Item] | None = None
    history: list[Item] = field(default_factory=list)

    def adopted(self, items: Sequence[Item]) -> None:
        """The runtime follows ``items`` from now on (a root call recorded it, or a pass ended)."""
        self.followed = list(items)
        self.history = []

    def pass_ended(self, items: Sequence[Item], *, completed: bool) -> list[Item] | None:
        """A pass of ``items`` ended (``completed``: it followed the order to its end); returns the
        order to follow from now on when it changes, else None."""
        if self.followed is None:  # the recording pass: its order is followed until seen otherwise
            self.followed, self.history = list(items), list(items)
            return self.followed
        if completed and not self.history:
            return None  # the order repeated, as confirmed before
        self.history.extend(items)
        found = period(self.history)
        if found is not None:
            start, length = found
            block = self.history[start : start + length]
            self.history = []
            if block != self.followed:
                self.followed = block
                return block
            return None
        limit = max(_HISTORY_MIN, _HISTORY_PER_ITEM * len(self.followed))
        del self.history[: max(0, len(self.history) - limit)]
        return None

    def recording_period(self, items: Sequence[Item]) -> list[Item] | None:
        """While recording (no order yet, the opener not called again): the block ``items`` ends by
        repeating after a prefix, which ends the recording; None while there is none."""
        found = period(items)
        if found is None:
            return None
        start, length = found
        return list(items[start : start + length])
