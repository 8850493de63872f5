"""A process forked from one that ran a compiled model: its first call works, the parent is unaffected.

multiprocessing's ``fork`` start method, DataLoader workers and pre-forking servers all copy a
process that may be mid-call on another thread. Each child here runs under a deadline: a hang
fails the test instead of blocking the run (the limits are far above any real call).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fake_streams import ThreadStreams
from test_runtime_cuda import use_cuda_engine
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, streaming_budget

import vramfx

DEADLINE_S = 120.0

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="this platform cannot fork"
)


def in_forked_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a forked child; what it returned, or the text of what it raised."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()

    def child() -> None:
        # Before the deadline, a hung child prints where it is stuck and exits.
        faulthandler.dump_traceback_later(DEADLINE_S - 10, exit=True)
        try:
            results.put(("returned", fn()))
        except BaseException as exc:  # reported to the parent, which fails the test
            results.put(("raised", f"{type(exc).__name__}: {exc}"))

    process = context.Process(target=child, daemon=True)
    process.start()
    process.join(DEADLINE_S)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"the forked child hung for {DEADLINE_S:.0f} s")
    assert process.exitcode == 0, f"the forked child died with exit code {process.exitcode}"
    return results.get()


def compiled_from_disk(arch_name: str, folder) -> tuple[vramfx.CompiledModule, dict, Any]:
    arch = ARCHS[arch_name]
    eager = build_saved(arch, folder)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(folder)
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget=streaming_budget(empty, weights, inputs), weights=weights, device="cpu")
    return fast, inputs, expected


@pytest.mark.parametrize("arch_name", ["llama", "flux"])
def test_a_forked_child_calls_a_compiled_model_as_the_parent_does(arch_name, tmp_path):
    fast, inputs, expected = compiled_from_disk(arch_name, tmp_path)
    assert_same_output(expected, fast(**inputs))
    assert fast.plan.streamed_bytes > 0

    def calls() -> bool:
        for _ in range(2):
            assert_same_output(expected, fast(**inputs))
        return True

    assert in_forked_child(calls) == ("returned", True)
    assert_same_output(expected, fast(**inputs))


def test_a_child_forked_while_another_thread_is_mid_call_works(tmp_path, monkeypatch):
    fast, inputs, expected = compiled_from_disk("llama", tmp_path)
    assert_same_output(expected, fast(**inputs))
    real_read = vramfx.DiskMap.read_into

    def slow_read(self, key, out, **kwargs):
        time.sleep(0.002)  # the reader thread is busy, and the lock held, when the fork comes
        return real_read(self, key, out, **kwargs)

    monkeypatch.setattr(vramfx.DiskMap, "read_into", slow_read)
    stop = threading.Event()
    outputs = []

    def keep_calling() -> None:
        while not stop.is_set():
            outputs.append(fast(**inputs))

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        results = []
        for _ in range(3):
            time.sleep(0.05)
            results.append(in_forked_child(lambda: (assert_same_output(expected, fast(**inputs)), True)[1]))
    finally:
        stop.set()
        caller.join()
    assert results == [("returned", True)] * 3
    assert outputs and all(torch.equal(expected.last_hidden_state, o.last_hidden_state) for o in outputs)


def test_a_cuda_engine_in_a_forked_child_refuses_with_what_to_do(tmp_path):
    fast, inputs, expected = compiled_from_disk("llama", tmp_path)
    fast(**inputs)
    use_cuda_engine(fast, ThreadStreams())
    assert_same_output(expected, fast(**inputs))
    kind, message = in_forked_child(lambda: fast(**inputs))
    assert kind == "raised"
    assert "VramfxError" in message and "forked" in message and "'spawn'" in message
    assert_same_output(expected, fast(**inputs))


def test_a_child_forked_while_another_thread_captures_refuses_with_what_to_do(tmp_path, monkeypatch):
    from vramfx import carried

    monkeypatch.setenv("VRAMFX_CACHE", "0")  # the first call must run torch.export, not read a cached capture
    fast, inputs, expected = compiled_from_disk("llama", tmp_path)
    parent, tracing, fork_done = os.getpid(), threading.Event(), threading.Event()
    real_lift = carried.lift_outputs

    def held_lift(out, objects):  # runs inside torch.export's trace of the model
        if os.getpid() == parent:
            tracing.set()
            fork_done.wait(DEADLINE_S)
        return real_lift(out, objects)

    monkeypatch.setattr(carried, "lift_outputs", held_lift)
    first = threading.Thread(target=lambda: fast(**inputs))
    first.start()
    try:
        assert tracing.wait(DEADLINE_S)
        kind, message = in_forked_child(lambda: fast(**inputs))
    finally:
        fork_done.set()
        first.join()
    assert kind == "raised" and "forked while another thread was capturing" in message and "'spawn'" in message
    assert_same_output(expected, fast(**inputs))
