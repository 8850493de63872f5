"""After ``fork``: objects a parent made renew what a child process cannot inherit.

A forked child gets a copy of the parent's memory but only the thread that forked: reader
threads and pools are gone, a lock another thread held stays locked forever, and a transfer in
flight never finishes. Objects that own such things register here; right after a fork, in the
child, each one's ``_after_fork_in_child()`` runs (single-threaded, before the child does
anything else), so the child re-creates them on first use, or refuses with a clear error where
it cannot (CUDA). The parent is not touched.

Examples
--------
>>> class Worker:
...     def _after_fork_in_child(self) -> None:
...         self.pool = None  # started again on first use
>>> worker = Worker()
>>> renew_after_fork(worker)
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class Renews(Protocol):
    def _after_fork_in_child(self) -> None: ...


# Keyed by id, values held weakly: registration neither keeps an object alive nor needs it hashable.
_LIVE: "weakref.WeakValueDictionary[int, Renews]" = weakref.WeakValueDictionary()


def renew_after_fork(obj: Renews) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while ``obj`` is alive."""
    _LIVE[id(obj)] = obj


def _after_fork_in_child() -> None:
    for obj in list(_LIVE.values()):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
