"""Nodes timed at their own shapes: what gets timed, what stays priced, and that planning with
the times changes predictions only, never outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, minimum_budget
from vramfx.capture import capture
from vramfx.plan.costs import CostModel, priced_node_seconds
from vramfx.plan.liveness import build_liveness, compute_nodes
from vramfx.plan import timing
from vramfx.plan.timing import _SPREAD, _WeightPool, node_signature, time_nodes, with_timed_nodes
from vramfx.plan.types import Liveness

CPU = CostModel.for_device("cpu")


@pytest.fixture(autouse=True)
def short_window(monkeypatch) -> None:
    """Passes spread over 0.6 s, not six: these tests check what is timed, not how typical it is."""
    monkeypatch.setattr(timing, "_WINDOW_S", 0.6)


class TwoLinears(torch.nn.Module):
    """Two Linears of one shape and a third of another, and a view between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)).reshape(x.shape)).relu()


def _captured() -> tuple:
    captured = capture(TwoLinears().to("meta"), (torch.randn(4, 16),))
    return captured, compute_nodes(captured.graph_module.graph)


def test_same_op_and_shapes_share_a_signature_and_views_have_none() -> None:
    _, nodes = _captured()
    linears = [n for n in nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 3
    first, second, third = (node_signature(n) for n in linears)
    assert first == second is not None
    assert third != first
    views = [n for n in nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.is_view]
    assert views and all(node_signature(n) is None for n in views)


def test_every_compute_op_is_timed_and_the_callers_rng_is_untouched() -> None:
    _, nodes = _captured()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    timed = time_nodes(nodes, "cpu", seconds=30.0, reuse=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(timed) == len(nodes)
    for node, seconds in zip(nodes, timed):
        if node_signature(node) is None:
            assert seconds is None
        else:
            assert seconds is not None and 0 < seconds < 1.0, (node, seconds)
    # Nodes of one signature are timed once and share the figure.
    linears = [t for n, t in zip(nodes, timed) if n.target == torch.ops.aten.linear.default]
    assert linears[0] == linears[1]
    # A later graph of this process reuses the figures: every plan is priced alike.
    assert time_nodes(nodes, "cpu", seconds=0.0) == timed


def test_no_time_or_no_room_leaves_nodes_priced() -> None:
    _, nodes = _captured()
    assert all(t is None for t in time_nodes(nodes, "cpu", seconds=0.0, reuse=False))
    # Operands larger than the cap are not made at all.
    assert all(t is None for t in time_nodes(nodes, "cpu", max_operand_bytes=64, reuse=False))


def test_weights_are_read_where_the_weights_lie_far_apart_and_never_twice_in_a_row() -> None:
    """Weight operands are cut from the weights' own memory where it holds their dtype (nothing
    allocated), each copy far from the last, and a later sample reads on."""
    memory = [torch.ones(1 << 18), torch.ones(1 << 20)]  # 1 MiB and 4 MiB of float32 weights
    pool = _WeightPool(torch.device("cpu"), 1 << 20, memory)
    fake = torch.empty(64, 64, device="meta")  # 16 KiB
    first = pool.copies([fake])
    assert pool.buffer is None and pool.key == f"weights {5 << 20}"
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in memory]
    pointers = [copy[0].data_ptr() for copy in first]
    assert all(any(lo <= p and p + fake.numel() * 4 <= hi for lo, hi in ranges) for p in pointers)
    assert all(copy[0].shape == fake.shape and copy[0].dtype == torch.float32 for copy in first)
    # Consecutive copies lie a 1/_SPREAD of the memory apart; the next sample reads other bytes.
    assert min(abs(a - b) for a, b in zip(pointers, pointers[1:])) >= (5 << 20) // _SPREAD - (16 << 10)
    spread = [copy[0].data_ptr() for k in range(0, _SPREAD, len(first)) for copy in pool.copies([fake], k)]
    assert len(set(spread[:_SPREAD])) == _SPREAD
    # A dtype the weights' memory does not hold is cut from a pool allocated for it.
    low = pool.copies([torch.empty(64, 64, dtype=torch.bfloat16, device="meta")])
    assert pool.buffer is not None and low[0][0].data_ptr() == pool.buffer.data_ptr()
    # A weight larger than both is not timed.
    assert pool.copies([torch.empty(2048, 1024, device="meta")]) is None


def test_a_view_op_that_copies_is_timed() -> None:
    """``to`` is a view by its schema, but a cast copies: it costs time, and is timed."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, 4, device="meta", dtype=torch.bfloat16)
    cast = graph.call_function(torch.ops.aten.to.dtype, (x, torch.float32))
    cast.meta["val"] = torch.empty(4, 4, device="meta")
    same = graph.call_function(torch.ops.aten.to.dtype, (x, torch.bfloat16))
    same.meta["val"] = x.meta["val"]
    assert node_signature(cast) is not None
    assert node_signature(same) is None


def test_ops_that_write_an_operand_are_not_timed() -> None:
    """An in-place op would write into the weights' memory it is timed on (a user's tensors)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, 4, device="meta")
    functional = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    in_place = graph.call_function(torch.ops.aten.add_.Tensor, (x, x))
    assert node_signature(functional) is not None
    assert node_signature(in_place) is None


def test_compile_times_nodes_on_the_weights_where_they_lie(tmp_path) -> None:
    """compile hands timing the weights' memory: a checkpoint's mapped pages when the page cache
    holds them, a state dict's own tensors."""
    from vramfx.compiler import weight_memory
    from vramfx.weights import as_source, resolve_weights

    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    aligned = vramfx.convert(tmp_path, tmp_path / "aligned", dtype=None)
    captured = capture(build_empty(arch), (), arch.inputs())
    cpu = torch.device("cpu")
    with vramfx.DiskMap(aligned) as weights:
        for key in weights:
            weights[key]  # read once: the page cache holds the file
        refs = resolve_weights(captured.weights, weights)
        memory = weight_memory(refs, cpu)
        mapped = {weights.mapped(ref.key).data_ptr() for ref in refs.values() if ref.source is weights}
        assert mapped and mapped <= {t.data_ptr() for t in memory}
        assert {t.dtype for t in memory} == {torch.float32}
        assert weight_memory(refs, torch.device("meta")) == []
        state = {key: weights[key].clone() for key in weights}
    refs = resolve_weights(captured.weights, as_source(state))
    host = {t.data_ptr() for t in weight_memory(refs, cpu)}
    assert {state[ref.key].data_ptr() for ref in refs.values() if ref.key in state} <= host
    # A plan that copies every weight keeps no file mapped for timing's sake.
    timed = dataclasses.replace(CPU, time_nodes=True)
    with vramfx.DiskMap(aligned) as weights:
        vramfx.compile(build_empty(arch), budget="1GB", weights=weights, device="cpu", example_kwargs=arch.inputs(),
                       cost_model=timed, in_place=False, cache=False)
        assert all(f.mapping is None for f in weights._files)


def test_untimed_nodes_are_scaled_by_what_timing_found_for_their_kind() -> None:
    lv = Liveness(
        num_positions=4, weights=(), activation_bytes=(0,) * 4, flops=(1e9, 1e9, 2e9, 1e9),
        memory_bytes=(0,) * 4, op_classes=("matmul:float32",) * 3 + ("conv:float32",),
        timed_seconds=(0.5, None, None, None),
    )
    cm = CostModel(compute_flops_per_s=1e9, memory_bytes_per_s=1e9, link_bytes_per_s=1e9, node_overhead_s=0.0)
    # Timed at 0.5 s where 1 s was priced: the other matmuls run twice as fast as priced; the
    # conv, whose kind was not timed, keeps its price.
    assert priced_node_seconds(lv, cm) == [0.5, 0.5, 1.0, 1.0]
    untimed = dataclasses.replace(lv, timed_seconds=())
    assert priced_node_seconds(untimed, cm) == [1.0, 1.0, 2.0, 1.0]


def test_spans_of_cast_weights_start_on_a_priced_node() -> None:
    """The node that casts a low-precision weight is priced with the cast: timing it alone would
    leave the cast out."""
    arch = ARCHS["llama"]
    model = build_empty(arch)
    captured = capture(model, (), arch.inputs())
    stored = {w.name: torch.bfloat16 for w in captured.weights if w.dtype == torch.float32}
    liveness = build_liveness(captured, storage_dtypes=stored)
    timed = with_timed_nodes(liveness, captured, "cpu", CPU, seconds=30.0)
    begins = {b for w in timed.weights if w.compute_dtype for b, _ in w.spans}
    assert begins
    assert all(timed.timed_seconds[b] is None for b in begins)
    assert any(t is not None for t in timed.timed_seconds)


def test_time_nodes_round_trips_through_the_plan_record() -> None:
    cm = CostModel(compute_flops_per_s=1e9, memory_bytes_per_s=1e9, link_bytes_per_s=1e9, time_nodes=True)
    assert CostModel.from_dict(cm.to_dict()) == cm
    assert "time_nodes" not in CPU.to_dict()
    assert CostModel.from_dict(CPU.to_dict()) == CPU


@pytest.mark.parametrize("arch_name", ["llama", "unet"])
def test_compile_with_timed_nodes_gives_eager_output(tmp_path, arch_name) -> None:
    arch = ARCHS[arch_name]
    expected_model = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = expected_model(**inputs)
    weights = vramfx.DiskMap(tmp_path)
    timed = dataclasses.replace(CPU, time_nodes=True)
    budget = minimum_budget(build_empty(arch), weights, inputs)
    fast = vramfx.compile(build_empty(arch), budget=budget, weights=weights, device="cpu", example_kwargs=inputs,
                          cost_model=timed, cache=False)
    assert fast.plan.cost_model.get("time_nodes") is True
    assert fast.plan.predicted.seconds_per_call > 0
    with torch.no_grad():
        assert_same_output(expected, fast(**inputs))
