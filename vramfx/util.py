"""Small helpers every layer shares: alignment, a free-list, byte and time formatting, dtype names.

The bottom of the package: it imports nothing from vramfx, so storage, the runtime, the planner
and the front ends can all use it without reaching up or across.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Arena slot alignment per device type: at least what kernels see for eager allocations.
ALIGNMENT = {"cpu": 64, "cuda": 256}

_BYTE_UNITS = (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1))


def align_up(nbytes: int, alignment: int) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment`` (how a plan counts a slot)."""
    return -(-nbytes // alignment) * alignment


def format_bytes(nbytes: int | float, *, round_up: bool = False) -> str:
    """Bytes in binary units for humans: ``512 B``, ``1.5 KiB``, ``37.2 MiB``, ``8.00 GiB``.

    Parameters
    ----------
    nbytes:
        A byte count; negative counts keep their sign.
    round_up:
        Round the shown figure up instead of to nearest, for minimums a user must reach
        (``pass budget >= 37.3 MiB`` must not read below the true minimum).

    Returns
    -------
    str

    Examples
    --------
    >>> format_bytes(1536), format_bytes(39006619), format_bytes(2**33)
    ('1.5 KiB', '37.2 MiB', '8.00 GiB')
    >>> format_bytes(1025, round_up=True)
    '1.1 KiB'
    """
    sign = "-" if nbytes < 0 else ""
    magnitude = abs(nbytes)
    if magnitude < 1024:
        return f"{sign}{magnitude:g} B" if isinstance(magnitude, float) else f"{sign}{magnitude} B"
    units = tuple(reversed(_BYTE_UNITS))  # KiB, MiB, GiB
    for k, (unit, scale, digits) in enumerate(units):
        steps = 10**digits
        exact = magnitude * steps / scale
        value = (math.ceil(exact) if round_up and not sign else round(exact)) / steps
        # 1023.96 KiB shows as 1.0 MiB, not as 1024.0 KiB.
        if value < 1024 or k == len(units) - 1:
            return f"{sign}{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """Seconds for humans: ``1.25 s``, ``12.3 ms``, ``45.0 µs``.

    Examples
    --------
    >>> format_seconds(0.0123), format_seconds(2.5), format_seconds(4.5e-5)
    ('12.3 ms', '2.50 s', '45.0 µs')
    """
    magnitude = abs(seconds)
    if magnitude >= 1.0 or magnitude == 0.0:
        return f"{seconds:.2f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def dtype_name(dtype: "torch.dtype") -> str:
    """How plans and messages name a dtype: ``bfloat16``, ``float8_e4m3fn``."""
    return str(dtype).removeprefix("torch.")


class FreeList:
    """The free gaps of ``[0, capacity)``, sorted and merged, handed out first fit.

    Blocks are half-open ``[start, start + size)``. The scheduler places transfers in the arena
    with it, and an engine places loads made off the plan in the same arena with it.

    Examples
    --------
    >>> free = FreeList(256)
    >>> a, b = free.allocate(128), free.allocate(64)
    >>> a, b, free.allocate(128)
    (0, 128, None)
    >>> free.release(a, 128); free.allocate(128)
    0
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = [0] if capacity > 0 else []
        self._ends: list[int] = [capacity] if capacity > 0 else []

    def allocate(self, size: int) -> int | None:
        """The start of the first gap of at least ``size`` bytes, now taken; None if none fits."""
        for k, (start, end) in enumerate(zip(self._starts, self._ends)):
            if end - start >= size:
                if end - start == size:
                    del self._starts[k], self._ends[k]
                else:
                    self._starts[k] = start + size
                return start
        return None

    def release(self, start: int, size: int) -> None:
        """Give back ``[start, start + size)``, merging it with the gaps it touches."""
        stop = start + size
        k = bisect_left(self._starts, start)
        merge_prev = k > 0 and self._ends[k - 1] == start
        merge_next = k < len(self._starts) and self._starts[k] == stop
        if merge_prev and merge_next:
            self._ends[k - 1] = self._ends[k]
            del self._starts[k], self._ends[k]
        elif merge_prev:
            self._ends[k - 1] = stop
        elif merge_next:
            self._starts[k] = start
        else:
            self._starts.insert(k, start)
            self._ends.insert(k, stop)

    def reserve(self, start: int, size: int) -> None:
        """Take ``[start, start + size)``, which must lie inside one gap."""
        stop = start + size
        k = bisect_right(self._starts, start) - 1
        assert k >= 0 and self._ends[k] >= stop, f"[{start}, {stop}) is not free"
        pieces = [(a, b) for a, b in ((self._starts[k], start), (stop, self._ends[k])) if b > a]
        self._starts[k : k + 1] = [a for a, _ in pieces]
        self._ends[k : k + 1] = [b for _, b in pieces]
