"""Pinning host weights in place: whole pages, bounded chunks, shared registrations, one warning."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from fake_streams import FakePinner

from vramfx.runtime.chunks import Segment
from vramfx.runtime.pinned import PinnedHostMemory, PinRegistry

PAGE = 4096
CHUNK = 4 * PAGE


def flat(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8)


def memory(pinner: FakePinner, registry: PinRegistry | None = None) -> PinnedHostMemory:
    return PinnedHostMemory(pinner, chunk_bytes=CHUNK, min_bytes=PAGE, page_bytes=PAGE, registry=PinRegistry() if registry is None else registry)


def test_whole_pages_are_registered_in_place_in_bounded_chunks_and_the_ends_staged():
    pinner = FakePinner()
    store = memory(pinner)
    weight = flat(11 * PAGE + 300)
    store.pin({"w": weight})
    segments = store.segments("w", weight.numel())
    assert sum(s.nbytes for s in segments) == weight.numel()
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    for s in segments:
        address = weight.data_ptr() + s.start
        if s.pinned:  # exactly the registered ranges: no copy, never past a chunk boundary
            assert pinner.ranges[address] == s.nbytes
            assert address // CHUNK == (address + s.nbytes - 1) // CHUNK
    pinned = sum(s.nbytes for s in segments if s.pinned)
    assert pinned == store.pinned_bytes == pinner.pinned_bytes >= 10 * PAGE
    store.release()
    assert pinner.ranges == {}
    assert store.segments("w", weight.numel()) == (Segment(0, weight.numel(), False),)


def test_tiny_weights_are_staged_and_pinned_ones_used_as_they_are():
    pinner = FakePinner()
    pinner.is_pinned = lambda t: t.numel() == 5000  # noqa: E731 - "allocated pinned" stand-in
    store = memory(pinner)
    # Under a page: it can never hold a whole page, wherever the allocator puts it.
    store.pin({"tiny": flat(PAGE - 64), "pinned": flat(5000)})
    assert store.segments("tiny", PAGE - 64) == (Segment(0, PAGE - 64, False),)
    assert store.segments("pinned", 5000) == (Segment(0, 5000, True),)
    assert pinner.ranges == {}


def test_registration_runs_off_the_calling_thread():
    # A failed driver call leaves a per-thread error that the caller's next kernel would report.
    threads = []
    pinner = FakePinner()
    register = pinner.register
    pinner.register = lambda a, n: (threads.append(threading.current_thread()), register(a, n))
    memory(pinner).pin({"w": flat(8 * PAGE)})
    assert threads and threading.current_thread() not in threads


def test_two_stores_over_the_same_weights_share_registrations():
    pinner, registry = FakePinner(), PinRegistry()
    weight = flat(9 * PAGE)
    first, second = memory(pinner, registry), memory(pinner, registry)
    first.pin({"w": weight})
    second.pin({"w": weight})
    assert first.segments("w", weight.numel()) == second.segments("w", weight.numel())
    held = dict(pinner.ranges)
    first.release()
    assert pinner.ranges == held, "still used by the second store"
    second.release()
    assert pinner.ranges == {} and len(registry) == 0


def test_a_memlock_limit_pins_what_fits_stages_the_rest_and_warns_once(caplog):
    pinner = FakePinner(limit_bytes=6 * PAGE)
    store = memory(pinner)
    weights = {"a": flat(9 * PAGE), "b": flat(9 * PAGE)}
    with caplog.at_level(logging.WARNING, logger="vramfx.runtime.pinned"):
        store.pin(weights)
        store.pin(weights)
    warnings = [r for r in caplog.records if "could not page-lock" in r.getMessage()]
    assert len(warnings) == 1
    assert "ulimit -l" in warnings[0].getMessage()
    for name, weight in weights.items():
        segments = store.segments(name, weight.numel())
        assert sum(s.nbytes for s in segments) == weight.numel()
    assert 0 < pinner.pinned_bytes <= 6 * PAGE
    store.release()


def test_chunk_size_must_be_whole_pages():
    with pytest.raises(ValueError, match="chunk_bytes"):
        PinnedHostMemory(FakePinner(), chunk_bytes=PAGE + 1, page_bytes=PAGE)


def test_memory_this_process_registered_is_not_taken_for_memory_allocated_pinned():
    pinner, registry = FakePinner(), PinRegistry()
    weight = flat(9 * PAGE)
    first = memory(pinner, registry)
    first.pin({"w": weight})
    # The driver now reports the weight as pinned; a second store must still stage its ends.
    pinner.is_pinned = lambda t: True  # noqa: E731
    second = memory(pinner, registry)
    second.pin({"w": weight})
    assert second.segments("w", weight.numel()) == first.segments("w", weight.numel())
    first.release()
    second.release()
    assert pinner.ranges == {}
