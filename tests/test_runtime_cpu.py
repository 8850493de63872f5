"""The CPU engine: arena slots filled by a reader thread, errors surfaced at wait, clean aborts."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from safetensors.torch import save_file

import vramfx
from test_rewrite import planned
from vramfx.capture import capture
from vramfx.plan.costs import CostModel
from vramfx.plan.liveness import build_liveness
from vramfx.plan.schedule import minimum_budget, schedule
from vramfx.runtime.cpu import CpuEngine
from vramfx.runtime.engine import ResidentStore, view_bytes
from vramfx.storage.ref import WeightRef
from vramfx.weights import resolve_weights


def engine_for(captured, plan, source=None, **kwargs):
    refs = resolve_weights(captured.weights, source)
    return CpuEngine(plan, refs, torch.device("cpu"), ResidentStore(), **kwargs)


def stream_every_transfer(engine, plan, values) -> None:
    """Fetch, wait for and drop each transfer in turn, checking the weights it brings."""
    for tr in plan.transfers:
        engine.fetch(tr.id)
        assert all(torch.equal(t, values[n]) for n, t in zip(tr.names, engine.wait(tr.id)))
        engine.drop(tr.id)


def test_wait_returns_the_weights_in_aligned_arena_slots():
    captured, plan = planned()
    engine = engine_for(captured, plan)
    engine.activate()
    values = {w.name: w.value for w in captured.weights}
    for tr in plan.transfers:
        engine.fetch(tr.id)
        tensors = engine.wait(tr.id)
        for name, tensor in zip(tr.names, tensors):
            assert torch.equal(tensor, values[name])
            assert tensor.data_ptr() % plan.alignment == 0
        engine.drop(tr.id)
    engine.end_call()
    engine.deactivate()


def test_a_reader_failure_surfaces_at_wait_and_abort_leaves_no_thread(monkeypatch):
    captured, plan = planned()
    threads = threading.active_count()
    engine = engine_for(captured, plan)
    engine.activate()

    def broken(self, out, **kwargs):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(type(engine.refs[plan.transfers[0].names[0]]), "read_into", broken)
    first = plan.transfers[0].id
    engine.fetch(first)
    with pytest.raises(vramfx.WeightsError, match=r"reading weights .* failed: .*injected"):
        engine.wait(first)
    engine.abort()
    engine.deactivate()
    assert threading.active_count() == threads


def test_end_of_call_with_a_transfer_never_dropped_is_an_error():
    captured, plan = planned()
    engine = engine_for(captured, plan)
    engine.activate()
    engine.fetch(plan.transfers[0].id)
    with pytest.raises(vramfx.VramfxError, match="never dropped"):
        engine.end_call()
    engine.deactivate()


def test_reads_from_disk_with_and_without_the_page_cache(tmp_path):
    captured, plan = planned()
    values = {w.name: w.value for w in captured.weights}
    save_file({k: v.contiguous() for k, v in values.items()}, tmp_path / "w.safetensors")
    specs = [type(w)(**{**w.__dict__, "value": None}) for w in captured.weights]
    for bypass in (False, True):
        refs = resolve_weights(specs, vramfx.DiskMap(tmp_path / "w.safetensors"))
        engine = CpuEngine(plan, refs, torch.device("cpu"), ResidentStore(), bypass_page_cache=bypass)
        engine.activate()
        stream_every_transfer(engine, plan, values)
        engine.deactivate()


def test_a_reader_error_of_any_type_is_forgotten_by_abort(monkeypatch):
    # A non-I/O error (here ValueError) used to stay pending through abort and re-raise from
    # every later begin_call, so one failed call broke the compiled model for good.
    captured, plan = planned()
    engine = engine_for(captured, plan)
    engine.activate()
    ref_type = type(engine.refs[plan.transfers[0].names[0]])
    real_read = ref_type.read_into

    def broken(self, out, **kwargs):
        raise ValueError("transient failure (injected)")

    monkeypatch.setattr(ref_type, "read_into", broken)
    first, second = plan.transfers[0].id, plan.transfers[1].id
    engine.begin_call()
    engine.fetch(first)
    engine.fetch(second)
    with pytest.raises(ValueError, match="injected"):
        engine.wait(first)
    engine.abort()  # drains the second failed copy without raising
    monkeypatch.setattr(ref_type, "read_into", real_read)
    engine.begin_call()
    stream_every_transfer(engine, plan, {w.name: w.value for w in captured.weights})
    engine.end_call()
    engine.deactivate()


def test_a_failed_resident_load_names_the_weight_and_frees_the_arena(monkeypatch, tmp_path):
    captured, plan = planned(budget_extra=10**6)
    assert plan.resident
    threads = threading.active_count()
    # Weights read from a file: host tensors on the CPU would be used where they lie, unread.
    refs = resolve_weights(captured.weights, None)
    save_file({n: r.source[r.key].contiguous() for n, r in refs.items()}, tmp_path / "w.safetensors")
    disk = vramfx.DiskMap(tmp_path / "w.safetensors")
    engine = CpuEngine(plan, {n: dataclasses.replace(r, source=disk, key=n) for n, r in refs.items()}, torch.device("cpu"),
                       ResidentStore())
    real_read = vramfx.DiskMap.read_into

    def broken(self, key, out, **kwargs):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(vramfx.DiskMap, "read_into", broken)
    with pytest.raises(vramfx.WeightsError, match=rf"reading resident weight {plan.resident[0]} failed: .*injected"):
        engine.activate()
    assert not engine.active, "a failed activation keeps no arena"
    assert threading.active_count() == threads
    monkeypatch.setattr(vramfx.DiskMap, "read_into", real_read)
    engine.activate()
    assert all(name in engine.store for name in plan.resident)
    engine.deactivate()


def test_host_weights_on_the_cpu_are_kept_where_they_lie():
    captured, plan = planned(budget_extra=10**6)
    engine = engine_for(captured, plan)
    engine.activate()
    for name in plan.resident:
        kept, own = engine.resident(name), engine.refs[name].source[engine.refs[name].key]
        assert kept.untyped_storage().data_ptr() == own.untyped_storage().data_ptr(), "no copy"
    engine.deactivate()


def test_arena_views_require_grad_like_the_parameter_where_the_dtype_allows():
    buffer = torch.zeros(64, dtype=torch.uint8)
    ref = WeightRef("w", None, "w", (4,), torch.float32, 16, requires_grad=True)
    view = view_bytes(buffer, 16, ref)
    assert view.requires_grad and view.data_ptr() == buffer.data_ptr() + 16, "a view, not a copy"
    assert not view_bytes(buffer, 0, dataclasses.replace(ref, requires_grad=False)).requires_grad
    stored_as_int8 = dataclasses.replace(ref, dtype=torch.int8, shape=(16,))  # e.g. quantized storage
    assert not view_bytes(buffer, 0, stored_as_int8).requires_grad



@pytest.mark.parametrize("source", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
def test_a_cast_fills_its_planned_slot_with_torchs_conversion(source, target):
    captured = capture(torch.nn.Linear(256, 256), (torch.randn(2, 256),), dtype=target)
    storage = {"weight": source}
    live = build_liveness(captured, storage_dtypes=storage)
    plan = schedule(live, minimum_budget(live), cost_model=CostModel.for_device("cpu"))
    engine = CpuEngine(plan, resolve_weights(captured.weights, None, storage=storage), torch.device("cpu"),
                       ResidentStore())
    engine.activate()
    every = torch.arange(256, dtype=torch.uint8).view(source).repeat(256, 1)  # every fp8 value
    out = engine.cast(0, every)
    bits = {2: torch.int16, 4: torch.int32}[target.itemsize]
    assert torch.equal(out.view(bits), every.to(target).view(bits))
    assert out.data_ptr() == engine._upcast.data_ptr() + plan.casts[0].offset, "in its planned slot"
    assert out.requires_grad, "as the parameter does, so kernels take eager's path"
    engine.deactivate()
