"""The layer-swap runtime: prefetch along the recorded order, deviations, errors, the limit."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import vramfx
from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management, swap_stats
from vramfx.swap.patch import bound_calls, swapped_forward
from vramfx.swap.runtime import SwapRuntime
from vramfx.swap.units import Unit, UnitBuilder

WIDTH, DEPTH = 64, 6
UNIT_BYTES = WIDTH * WIDTH * 4 + WIDTH * 4


class Stack(torch.nn.Module):
    """Linear layers; ``skip`` (plain Python state) leaves some out, which changes the module order."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.skip: set[int] = set()
        self.fail_at: int | None = None

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i == self.fail_at:
                raise RuntimeError(f"layer {i} failed")
            if i not in self.skip:
                x = torch.tanh(layer(x))
        return x


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    eager = Stack().eval()
    path = tmp_path_factory.mktemp("stack") / "model.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path


def streamed_stack(path, limit, **kwargs):
    with vramfx.skip_model_initialization():
        model = Stack().eval()
    return enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear},
                                  dict(offload_device="disk", computation_device="cpu"),
                                  vram_limit=f"{limit}B" if limit else 0, disk_map=vramfx.DiskMap(path), **kwargs)


X = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))


def test_later_calls_fetch_ahead_along_the_recorded_order(saved):
    eager, path = saved
    model = streamed_stack(path, 3 * UNIT_BYTES)
    with torch.no_grad():
        expected = eager(X)
        for _ in range(3):  # record; load the kept layers; steady
            assert torch.equal(expected, model(X))
    stats = swap_stats(model)
    streamed = DEPTH - len(stats.resident)
    assert streamed > 0 and stats.synchronous == 0 and stats.prefetched == streamed
    # Kept weights are chosen tensor by tensor: a layer's bias may stay while its weight streams.
    assert 0 < stats.streamed_bytes == stats.fetched_bytes <= streamed * UNIT_BYTES
    assert stats.held_peak_bytes <= 3 * UNIT_BYTES


def test_without_prefetch_every_streamed_layer_is_read_when_called(saved):
    eager, path = saved
    model = streamed_stack(path, 3 * UNIT_BYTES, prefetch=False)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(eager(X), model(X))
    stats = swap_stats(model)
    assert stats.prefetched == 0 and stats.synchronous == DEPTH - len(stats.resident) > 0
    assert stats.fetched_bytes == stats.streamed_bytes > 0


def test_a_module_off_the_recorded_order_is_fetched_now_and_the_new_order_followed(saved):
    eager, path = saved
    model = streamed_stack(path, 3 * UNIT_BYTES)
    with torch.no_grad():
        for _ in range(3):
            model(X)
        eager.skip = model.skip = {1, 2}
        try:
            assert torch.equal(eager(X), model(X))
            assert swap_stats(model).order == ("layers.0", "layers.3", "layers.4", "layers.5")
            for _ in range(2):  # planned anew: the layers now kept are loaded once
                assert torch.equal(eager(X), model(X))
            assert swap_stats(model).synchronous == 0, "the new order is fetched ahead"
        finally:
            eager.skip = set()


def test_an_error_inside_a_module_leaves_the_model_usable(saved):
    eager, path = saved
    model = streamed_stack(path, 3 * UNIT_BYTES)
    with torch.no_grad():
        model(X)
        model(X)
        model.fail_at = 3
        with pytest.raises(RuntimeError, match="layer 3 failed"):
            model(X)
        model.fail_at = None
        assert all(p.is_meta for p in model.parameters()), "the faces are back in place"
        assert torch.equal(eager(X), model(X))
        assert torch.equal(eager(X), model(X))


def test_an_output_that_views_a_streamed_weight_outlives_its_block(saved):
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = torch.nn.Parameter(torch.randn(8, WIDTH))

        def forward(self, i):
            return self.rows[i]  # a view of the weight

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ModuleList(Table() for _ in range(4))

        def forward(self, i):
            return [t(i) for t in self.tables]

    torch.manual_seed(0)
    eager = Model()
    path = saved[1].parent / "tables.safetensors"
    save_file(eager.state_dict(), path)
    with vramfx.skip_model_initialization():
        model = Model()
    enable_vram_management(model, {Table: AutoWrappedModule}, dict(offload_device="disk", computation_device="cpu"),
                           vram_limit="4KiB", disk_map=vramfx.DiskMap(path))
    with torch.no_grad():
        outputs = [model(k) for k in range(4)]
    for k, out in enumerate(outputs):
        assert all(torch.equal(o, t.rows[k]) for o, t in zip(out, eager.tables))


@given(
    skips=st.lists(st.sets(st.integers(0, DEPTH - 1), max_size=3), min_size=1, max_size=6),
    limit_units=st.floats(0, DEPTH + 1),
    prefetch=st.booleans(),
)
def test_any_sequence_of_module_orders_equals_eager_within_the_limit(saved, skips, limit_units, prefetch):
    eager, path = saved
    limit = int(limit_units * UNIT_BYTES)
    model = streamed_stack(path, limit, prefetch=prefetch)
    try:
        with torch.no_grad():
            for skip in skips:
                eager.skip = model.skip = skip
                assert torch.equal(eager(X), model(X))
    finally:
        eager.skip = set()
    assert swap_stats(model).held_peak_bytes <= max(limit, UNIT_BYTES)


def test_the_same_order_nested_otherwise_leaves_the_plan_instead_of_reusing_slots_in_use(tmp_path):
    class Outer(torch.nn.Module):
        """Calls ``inner`` from within its forward, or leaves it to the caller."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
            self.inner = torch.nn.Linear(WIDTH, WIDTH)
            self.nest = False

        def forward(self, x):
            if self.nest:
                x = self.inner(x)
            return x @ self.weight  # read after inner returned

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = Outer()
            self.tail = torch.nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            x = self.outer(x)
            if not self.outer.nest:
                x = self.outer.inner(x)
            return self.tail(x)

    torch.manual_seed(0)
    eager = Model()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        model = Model()
    # Outer, its inner Linear and the tail are separate units; their order is the same either way.
    # Room for one of them at a time: all three stream through the same arena slots.
    runtime = SwapRuntime(torch.device("cpu"), limit_bytes=UNIT_BYTES * 6 // 5)
    builder = UnitBuilder(model, vramfx.DiskMap(tmp_path / "model.safetensors"))
    for name, module in (("outer", model.outer), ("outer.inner", model.outer.inner), ("tail", model.tail)):
        slots = builder.slots(module, name, recursive=False, required=False)
        unit = runtime.add(Unit(name, slots, device=torch.device("cpu"), compute_dtypes=(torch.float32,) * len(slots)))
        swapped_forward(module, unit, runtime)
    bound_calls(model, runtime)
    with torch.no_grad():
        for nest in (False, False, True, True, False):
            eager.outer.nest = model.outer.nest = nest
            assert torch.equal(eager(X), model(X))
    assert runtime.stats().fetched_bytes > 0


@pytest.mark.parametrize(
    ("offload_device", "offload_dtype"),
    [("disk", None), ("disk", torch.bfloat16), ("cpu", None), ("cpu", torch.bfloat16)],
    ids=["disk", "disk-bf16", "cpu", "cpu-bf16"],
)
@pytest.mark.parametrize("limit", [0, UNIT_BYTES // 2, UNIT_BYTES])
def test_a_limit_below_two_modules_loads_one_at_a_time_on_every_offload_device(saved, offload_device, offload_dtype, limit):
    eager, path = saved
    reference = eager
    if offload_dtype is not None:
        reference = Stack().eval()
        with torch.no_grad():
            for mine, theirs in zip(reference.parameters(), eager.parameters()):
                mine.copy_(theirs.to(offload_dtype).float())
    with vramfx.skip_model_initialization():
        model = Stack().eval()
    config = dict(offload_device=offload_device, computation_device="cpu", computation_dtype=torch.float32)
    if offload_dtype is not None:
        config["offload_dtype"] = offload_dtype
    enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear}, config,
                           vram_limit=f"{limit}B" if limit else 0, disk_map=vramfx.DiskMap(path))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(reference(X), model(X))
    stats = swap_stats(model)
    # One module at a time: its weights as moved (bf16 from disk) and what they are cast into.
    one_module = UNIT_BYTES + (UNIT_BYTES // 2 if offload_device == "disk" and offload_dtype else 0)
    assert stats.held_peak_bytes <= max(limit, one_module)
    if offload_device == "disk":
        assert stats.resident == () and stats.prefetched + stats.synchronous == DEPTH, "every module streams"


def test_calls_from_several_threads_are_serialised_and_each_equals_eager(saved):
    eager, path = saved
    model = streamed_stack(path, 3 * UNIT_BYTES)
    inputs = [torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    with torch.no_grad():
        expected = [eager(x) for x in inputs]
    failures: list[str] = []

    def worker(k: int) -> None:
        with torch.no_grad():
            for call in range(20):
                if not torch.equal(expected[k], model(inputs[k])):
                    failures.append(f"thread {k}, call {call}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert not failures, failures
    stats = swap_stats(model)
    assert stats.calls == 80 and stats.held_peak_bytes <= 3 * UNIT_BYTES


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_layer_swap_path_keeps_cuda_ordering_on_the_cuda_engine(saved, monkeypatch, prefetch):
    """The CUDA engine on host-thread streams whose copies lag: prefetch, off-plan loads into freed
    arena bytes and the next call's early fetches must each wait for what they overwrite."""
    from fake_streams import ThreadStreams

    from vramfx.runtime.cuda import CudaEngine
    from vramfx.swap import runtime as runtime_module

    eager, path = saved
    streams = ThreadStreams(copy_delay_s=0.0005)

    def cuda_engine(plan, refs, device, store, **kwargs):
        return CudaEngine(plan, refs, device, store, streams=streams, pin_host=False, slot_bytes=4096, slots=3,
                          readers=2)

    monkeypatch.setattr(runtime_module, "make_engine", cuda_engine)
    model = streamed_stack(path, 2 * UNIT_BYTES, prefetch=prefetch)
    try:
        with torch.no_grad():
            for skip in (set(), set(), {1, 2}, {1, 2}, set(), {4}, set()):
                eager.skip = model.skip = skip
                assert torch.equal(eager(X), model(X))
    finally:
        eager.skip = set()
    assert swap_stats(model).held_peak_bytes <= 2 * UNIT_BYTES
    model.__dict__["_vramfx_swap"].runtime.release()
    streams.close()
