"""The streaming arena: first-fit blocks that never overlap and come back whole."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from vramfx.swap.arena import Arena


def test_blocks_are_aligned_first_fit_and_merge_when_freed():
    arena = Arena(1024, torch.device("cpu"), alignment=64)
    a, b, c = arena.allocate(100), arena.allocate(64), arena.allocate(200)
    assert (a, b, c) == (0, 128, 192)
    assert arena.allocate(1024) is None
    arena.free(b, 64)
    assert arena.allocate(65) == 448, "a 65-byte block skips the 64-byte gap"
    arena.free(a, 100)
    assert arena.allocate(192) == 0, "neighbouring gaps merge"
    assert arena.owns(arena.buffer[64:128].view(torch.float32))
    assert not arena.owns(torch.empty(4))


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=60))
def test_live_blocks_never_overlap_and_all_memory_comes_back(steps):
    arena = Arena(2048, torch.device("cpu"), alignment=64)
    live: list[tuple[int, int]] = []
    for allocate, nbytes in steps:
        if allocate or not live:
            offset = arena.allocate(nbytes)
            if offset is None:
                continue
            assert offset % 64 == 0 and offset + nbytes <= 2048
            for start, size in live:
                assert offset + arena.size_of(nbytes) <= start or start + arena.size_of(size) <= offset
            live.append((offset, nbytes))
        else:
            arena.free(*live.pop(nbytes % len(live)))
    for block in live:
        arena.free(*block)
    assert arena.allocate(2048) == 0


def test_reset_keeps_only_the_blocks_still_in_use():
    arena = Arena(1024, torch.device("cpu"), alignment=64)
    arena.reset([(128, 100), (640, 64)])
    assert arena.allocate(128) == 0
    assert arena.allocate(256) == 256, "the gap between the two blocks in use"
    assert arena.allocate(512) is None
    assert arena.allocate(320) == 704
