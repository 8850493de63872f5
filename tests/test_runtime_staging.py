"""The staging ring on host-thread streams: slot reuse, copy ordering, errors, fallbacks."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from fake_streams import ThreadStreams

from vramfx.runtime.chunks import Member, Segment, plan_chunks, whole
from vramfx.runtime.staging import StagingPipeline


class Sources:
    """Named random byte strings; reads can be slowed down or made to fail."""

    def __init__(self, sizes: dict[str, int], *, read_delay_s: float = 0.0, fail: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = {n: torch.randint(0, 256, (s,), dtype=torch.uint8, generator=g) for n, s in sizes.items()}
        self.read_delay_s = read_delay_s
        self.fail = fail
        self.readers: set[str] = set()

    def read(self, piece, out) -> None:
        self.readers.add(threading.current_thread().name)
        if piece.name == self.fail:
            raise OSError(5, f"Input/output error reading {piece.name} (injected)")
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        out.copy_(self.data[piece.name][piece.src_start : piece.src_start + piece.nbytes])

    def view(self, piece):
        return self.data[piece.name][piece.src_start : piece.src_start + piece.nbytes]


def laid_out(sizes: dict[str, int]) -> tuple[list[Member], int]:
    members, at = [], 0
    for name, size in sizes.items():
        members.append(Member(name, at, size, at + size))
        at += size
    return members, at


def one_weight(pipe: StagingPipeline, name: str, nbytes: int):
    """The copies of one weight at the start of a destination."""
    return plan_chunks([Member(name, 0, nbytes, nbytes)], {name: whole(nbytes)}, pipe.slot_bytes)


def landed(streams, job) -> None:
    """Wait for a job's copies to be queued and run."""
    job.result()
    streams.synchronize_event(job.landed)


def pipeline(streams, sources, **kwargs) -> StagingPipeline:
    kwargs = {"slot_bytes": 256, "slots": 2, "readers": 3, **kwargs}
    pipe = StagingPipeline(streams, sources.read, sources.view, **kwargs)
    pipe.start()
    return pipe


def test_a_slot_is_refilled_only_after_its_copy_has_run():
    # Copies lag behind readers (random delays); a slot overwritten too early corrupts dst.
    sizes = {f"w{i}": 200 + 37 * i for i in range(12)}
    streams = ThreadStreams(copy_delay_s=0.003)
    sources = Sources(sizes)
    pipe = pipeline(streams, sources)
    members, total = laid_out(sizes)
    dst = streams.device_buffer(total)
    landed(streams, pipe.submit(dst, plan_chunks(members, {n: whole(s) for n, s in sizes.items()}, pipe.slot_bytes)))
    for m in members:
        assert torch.equal(dst[m.offset : m.offset + m.nbytes], sources.data[m.name])
    assert pipe.host_bytes == 2 * 256, "host memory is the ring, whatever was moved"
    assert len(sources.readers) > 1, "reads ran on several threads"
    pipe.stop()
    streams.close()


def test_copies_wait_for_the_events_they_were_submitted_with():
    # A slow "kernel" still reads dst on the compute stream; the second job overwrites dst only
    # after the event recorded behind that kernel.
    streams = ThreadStreams(async_compute=True)
    sources = Sources({"old": 300, "new": 300})
    pipe = pipeline(streams, sources)
    dst = streams.device_buffer(300)
    first = pipe.submit(dst, one_weight(pipe, "old", 300))
    first.result()
    streams.wait_event(streams.compute_stream(), first.landed)
    seen = []
    streams.launch(lambda: (time.sleep(0.05), seen.append(dst.clone())))
    dropped = streams.new_event()
    streams.record(dropped, streams.compute_stream())
    landed(streams, pipe.submit(dst, one_weight(pipe, "new", 300), wait_for=[dropped]))
    streams.synchronize_stream(streams.compute_stream())
    assert torch.equal(seen[0], sources.data["old"]), "the kernel saw bytes copied under it"
    assert torch.equal(dst, sources.data["new"])
    pipe.stop()
    streams.close()


def test_direct_and_staged_copies_share_one_queue():
    streams = ThreadStreams(copy_delay_s=0.001)
    sources = Sources({"w": 1000})
    pipe = pipeline(streams, sources, slot_bytes=128)
    segments = {"w": (Segment(0, 100, False), Segment(100, 800, True), Segment(900, 100, False))}
    chunks = plan_chunks([Member("w", 0, 1000, 1024)], segments, pipe.slot_bytes)
    dst = streams.device_buffer(1024)
    landed(streams, pipe.submit(dst, chunks))
    assert torch.equal(dst[:1000], sources.data["w"])
    pipe.stop()
    streams.close()


def test_a_read_error_fails_its_job_only_and_frees_its_slots():
    streams = ThreadStreams(copy_delay_s=0.001)
    sources = Sources({"bad": 700, "good": 700}, fail="bad")
    pipe = pipeline(streams, sources, slots=1, readers=2)
    dst = streams.device_buffer(700)
    bad = pipe.submit(dst, one_weight(pipe, "bad", 700))
    good = pipe.submit(dst, one_weight(pipe, "good", 700))
    with pytest.raises(OSError, match="injected"):
        bad.result()
    landed(streams, good)
    assert torch.equal(dst, sources.data["good"])
    pipe.stop()
    streams.close()


def test_one_slot_and_many_readers_never_deadlock():
    sizes = {f"w{i}": 500 for i in range(6)}
    streams = ThreadStreams(copy_delay_s=0.001)
    sources = Sources(sizes, read_delay_s=0.001)
    pipe = pipeline(streams, sources, slot_bytes=64, slots=1, readers=4)
    members, total = laid_out(sizes)
    dst = streams.device_buffer(total)
    jobs = [pipe.submit(dst, plan_chunks([m], {m.name: whole(m.nbytes)}, 64)) for m in members]
    for job in jobs:
        job.result()
    streams.synchronize_stream(streams.copy_stream)
    assert all(torch.equal(dst[m.offset : m.offset + m.nbytes], sources.data[m.name]) for m in members)
    pipe.stop()
    streams.close()


def test_without_pinned_memory_it_stages_in_pageable_memory_with_one_warning(caplog):
    streams = ThreadStreams(fail_pinned_alloc=True)
    sources = Sources({"w": 300})
    with caplog.at_level(logging.WARNING, logger="vramfx.runtime.staging"):
        pipe = pipeline(streams, sources)
    assert not pipe.pinned
    assert [r.getMessage() for r in caplog.records if "pinned staging" in r.getMessage()]
    dst = streams.device_buffer(300)
    landed(streams, pipe.submit(dst, one_weight(pipe, "w", 300)))
    assert torch.equal(dst, sources.data["w"])
    pipe.stop()
    streams.close()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="slots"):
        StagingPipeline(ThreadStreams(), print, print, slots=0)
