"""How one transfer's bytes are cut into host-to-device copies.

Pure data in, data out, so every rule here is tested without a GPU. A weight's bytes are
described by *segments*: stretches that are either page-locked where they lie (copied straight
to the device) or not (first read into a fixed-size pinned staging slot). Staged stretches are
packed into *chunks* of at most one slot, in destination order; each chunk is one copy.

A chunk may run across the alignment padding between two members of a transfer (the padding
belongs to the transfer, so the copy's garbage there harms nothing); it never runs across bytes
that are not reserved for the transfer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, start + nbytes)`` of one weight, and whether they are page-locked."""

    start: int
    nbytes: int
    pinned: bool


@dataclass(frozen=True)
class Member:
    """One weight's place in a destination buffer.

    Its bytes land at ``[offset, offset + nbytes)``; ``[offset, reserved_end)`` is reserved for
    it (the rest is alignment padding that nothing else occupies).
    """

    name: str
    offset: int
    nbytes: int
    reserved_end: int


@dataclass(frozen=True)
class Piece:
    """Bytes ``[src_start, src_start + nbytes)`` of weight ``name``, landing at ``dst_offset``."""

    name: str
    src_start: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One host-to-device copy into ``[dst_start, dst_start + nbytes)`` of the destination.

    A staged chunk is read into one staging slot laid out like its destination span (piece at
    slot byte ``dst_offset - dst_start``) and copied in one go; a direct chunk is one piece
    copied straight from page-locked host memory.
    """

    dst_start: int
    nbytes: int
    pieces: tuple[Piece, ...]
    staged: bool


def whole(nbytes: int) -> tuple[Segment, ...]:
    """One weight that is not page-locked: a single staged segment."""
    return (Segment(0, nbytes, False),) if nbytes else ()


def plan_chunks(
    members: Sequence[Member],
    segments: Mapping[str, Sequence[Segment]],
    slot_bytes: int,
) -> tuple[Chunk, ...]:
    """Cut ``members`` into copies: direct ones for pinned segments, staged ones of ``<= slot_bytes``.

    Parameters
    ----------
    members:
        Where each weight lands; reserved ranges must not overlap.
    segments:
        For each member's name, segments covering ``[0, nbytes)`` in order.
    slot_bytes:
        Size of one staging slot: the most bytes (padding included) one staged chunk spans.

    Returns
    -------
    tuple[Chunk, ...]
        Direct chunks as they come, staged chunks when closed; together they cover every byte
        of every member exactly once.

    Examples
    --------
    >>> m = [Member("a", 0, 6, 8), Member("b", 8, 4, 12)]
    >>> [(c.dst_start, c.nbytes) for c in plan_chunks(m, {"a": whole(6), "b": whole(4)}, 16)]
    [(0, 12)]
    """
    if slot_bytes <= 0:
        raise ValueError(f"slot_bytes must be > 0, got {slot_bytes}")
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    start = end = 0  # the open staged chunk's span [start, end)
    pad_end = 0  # bytes up to here may be covered too: the last piece's member padding

    def close() -> None:
        if pieces:
            chunks.append(Chunk(start, end - start, tuple(pieces), staged=True))
            pieces.clear()

    for member in sorted(members, key=lambda m: m.offset):
        covered = 0
        for seg in segments.get(member.name, ()):
            assert seg.start == covered, f"segments of {member.name} must cover it in order"
            covered += seg.nbytes
            if seg.nbytes == 0:
                continue
            if seg.pinned:
                dst = member.offset + seg.start
                chunks.append(Chunk(dst, seg.nbytes, (Piece(member.name, seg.start, dst, seg.nbytes),), False))
                continue
            src = seg.start
            while src < seg.start + seg.nbytes:
                dst = member.offset + src
                joins = pieces and end <= dst <= max(end, pad_end) and dst - start < slot_bytes
                if not joins:
                    close()
                    start = end = dst
                take = min(seg.start + seg.nbytes - src, slot_bytes - (dst - start))
                pieces.append(Piece(member.name, src, dst, take))
                src += take
                end = dst + take
                pad_end = member.reserved_end if src == member.nbytes else end
        assert covered == member.nbytes, f"segments of {member.name} cover {covered} of {member.nbytes} bytes"
    close()
    return tuple(chunks)
