"""Cutting transfers into copies: every byte once, slots never overrun, padding only our own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vramfx.runtime.chunks import Member, Segment, plan_chunks, whole

SENTINEL = 0xEE


def apply(chunks, members, sources, dst_bytes: int, slot_bytes: int) -> torch.Tensor:
    """Run the chunks as the pipeline does: staged ones through one slot laid out like dst."""
    dst = torch.full((dst_bytes,), SENTINEL, dtype=torch.uint8)
    for chunk in chunks:
        if chunk.staged:
            assert chunk.nbytes <= slot_bytes
            slot = torch.randint(0, 256, (slot_bytes,), dtype=torch.uint8)  # stale garbage
            for p in chunk.pieces:
                at = p.dst_offset - chunk.dst_start
                slot[at : at + p.nbytes] = sources[p.name][p.src_start : p.src_start + p.nbytes]
            dst[chunk.dst_start : chunk.dst_start + chunk.nbytes] = slot[: chunk.nbytes]
        else:
            (p,) = chunk.pieces
            dst[p.dst_offset : p.dst_offset + p.nbytes] = sources[p.name][p.src_start : p.src_start + p.nbytes]
    return dst


def test_small_weights_share_one_copy_across_their_padding():
    members = [Member("a", 0, 6, 8), Member("b", 8, 4, 12), Member("c", 16, 4, 20)]
    chunks = plan_chunks(members, {m.name: whole(m.nbytes) for m in members}, slot_bytes=64)
    # a and b touch (b starts where a's padding ends); c starts past b's reservation.
    assert [(c.dst_start, c.nbytes, [p.name for p in c.pieces]) for c in chunks] == [(0, 12, ["a", "b"]), (16, 4, ["c"])]


def test_a_weight_larger_than_a_slot_is_split_across_slots():
    chunks = plan_chunks([Member("w", 256, 1000, 1024)], {"w": whole(1000)}, slot_bytes=300)
    assert [(c.dst_start, c.nbytes) for c in chunks] == [(256, 300), (556, 300), (856, 300), (1156, 100)]
    assert all(c.staged for c in chunks)


def test_pinned_stretches_are_copied_directly_and_the_ends_staged():
    segments = {"w": (Segment(0, 100, False), Segment(100, 4096, True), Segment(4196, 50, False))}
    chunks = plan_chunks([Member("w", 0, 4246, 4352)], segments, slot_bytes=1 << 20)
    assert [(c.staged, c.dst_start, c.nbytes) for c in chunks] == [(False, 100, 4096), (True, 0, 100), (True, 4196, 50)]


def test_segments_must_cover_the_weight():
    with pytest.raises(AssertionError, match="cover"):
        plan_chunks([Member("w", 0, 10, 16)], {"w": (Segment(0, 5, False),)}, slot_bytes=64)
    with pytest.raises(ValueError, match="slot_bytes"):
        plan_chunks([], {}, slot_bytes=0)


@st.composite
def layouts(draw):
    """Members with random sizes, padding and gaps; segments with pinned stretches; a slot size."""
    members, segments, sources = [], {}, {}
    at = draw(st.integers(0, 64))
    for i in range(draw(st.integers(0, 8))):
        nbytes = draw(st.integers(0, 700))
        pad = draw(st.integers(0, 40))
        name = f"w{i}"
        members.append(Member(name, at, nbytes, at + nbytes + pad))
        cuts = sorted(draw(st.sets(st.integers(1, max(nbytes - 1, 1)), max_size=4))) if nbytes > 1 else []
        bounds = [0, *[c for c in cuts if c < nbytes], nbytes]
        segments[name] = tuple(
            Segment(b, e - b, draw(st.booleans())) for b, e in zip(bounds, bounds[1:]) if e > b
        )
        sources[name] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        at += nbytes + pad + draw(st.sampled_from([0, 0, 1, 17]))  # a gap nobody reserved
    return members, segments, sources, at, draw(st.integers(1, 512))


@given(layouts())
def test_every_byte_lands_once_and_nothing_outside_reservations_is_touched(layout):
    members, segments, sources, end, slot_bytes = layout
    chunks = plan_chunks(members, segments, slot_bytes)
    pieces = sorted((p.name, p.src_start, p.nbytes) for c in chunks for p in c.pieces)
    for m in members:
        covered = [(s, n) for name, s, n in pieces if name == m.name]
        assert sum(n for _, n in covered) == m.nbytes
    dst = apply(chunks, members, sources, end + 1024, slot_bytes)
    reserved = torch.zeros(end + 1024, dtype=torch.bool)
    for m in members:
        assert torch.equal(dst[m.offset : m.offset + m.nbytes], sources[m.name])
        reserved[m.offset : m.reserved_end] = True
    assert (dst[~reserved] == SENTINEL).all(), "a copy wrote bytes no member reserved"
    for c in chunks:
        if not c.staged:
            (p,) = c.pieces
            assert any(s.pinned and s.start <= p.src_start and p.src_start + p.nbytes <= s.start + s.nbytes
                       for s in segments[p.name])
