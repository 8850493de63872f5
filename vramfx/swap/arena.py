"""One device buffer that streamed units take blocks of, first fit.

A single allocation of the streaming capacity keeps the memory the budget counts exact: blocks
are handed out and returned without the allocator seeing them, so freed weights cannot linger
in an allocator's cache or fragment it beyond the budget.
"""

from __future__ import annotations

from bisect import bisect_left

import torch

from vramfx.util import align_up


class Arena:
    """A buffer of ``nbytes`` on ``device``, handed out in aligned blocks.

    Blocks are ``[offset, offset + size)``, half-open. Allocation is first fit over the free
    gaps, which stay sorted and merged.

    Examples
    --------
    >>> arena = Arena(256, torch.device("cpu"), alignment=64)
    >>> a, b = arena.allocate(100), arena.allocate(64)
    >>> a, b, arena.allocate(128)
    (0, 128, None)
    >>> arena.free(a, 100); arena.allocate(128)
    0
    """

    def __init__(self, nbytes: int, device: torch.device, *, alignment: int) -> None:
        self.nbytes = nbytes
        self.alignment = alignment
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._starts: list[int] = [0] if nbytes else []
        self._ends: list[int] = [nbytes] if nbytes else []

    def size_of(self, nbytes: int) -> int:
        """What a block of ``nbytes`` occupies."""
        return align_up(nbytes, self.alignment)

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a free block of ``nbytes``, or None when no gap is large enough."""
        size = self.size_of(nbytes)
        for k, (start, end) in enumerate(zip(self._starts, self._ends)):
            if end - start >= size:
                if end - start == size:
                    del self._starts[k], self._ends[k]
                else:
                    self._starts[k] = start + size
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Return the block at ``offset`` of ``nbytes``."""
        start, stop = offset, offset + self.size_of(nbytes)
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

    def reset(self, occupied: list[tuple[int, int]] = ()) -> None:  # type: ignore[assignment]
        """Forget every block, then mark ``occupied`` ``(offset, nbytes)`` blocks as taken."""
        self._starts, self._ends = ([0], [self.nbytes]) if self.nbytes else ([], [])
        for offset, nbytes in sorted(occupied):
            k = next(k for k in range(len(self._starts)) if self._starts[k] <= offset < self._ends[k])
            start, end = self._starts[k], self._ends[k]
            stop = offset + self.size_of(nbytes)
            pieces = [(a, b) for a, b in ((start, offset), (stop, end)) if b > a]
            self._starts[k : k + 1] = [a for a, _ in pieces]
            self._ends[k : k + 1] = [b for _, b in pieces]

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` views this arena's memory."""
        return same_memory(tensor, self.buffer)


def same_memory(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` views ``buffer``'s memory."""
    return tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
