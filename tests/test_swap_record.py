"""The module-order recorder and the Liveness the planner reads from a recorded call."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import vramfx
from vramfx.plan.costs import CostModel
from vramfx.plan.schedule import schedule
from vramfx.swap.record import FlopCount, Recorder, to_liveness
from vramfx.swap.runtime import bind
from vramfx.swap.units import Unit, UnitBuilder


def meta_units(widths: list[int], folder) -> list[Unit]:
    """One unit per Linear, parameters meta and stored on disk (so every call copies)."""
    real = torch.nn.ModuleList(torch.nn.Linear(w, w) for w in widths)
    save_file(real.state_dict(), folder / "model.safetensors")
    with vramfx.skip_model_initialization():
        model = torch.nn.ModuleList(torch.nn.Linear(w, w) for w in widths)
    builder = UnitBuilder(model, vramfx.DiskMap(folder / "model.safetensors"))
    units = []
    for i, layer in enumerate(model):
        slots = builder.slots(layer, str(i), recursive=False, required=False)
        unit = Unit(str(i), slots, device=torch.device("cpu"), compute_dtypes=(torch.float32,) * 2)
        unit.index = i
        units.append(unit)
    return units


def record_nested(recorder: Recorder) -> Recorder:
    """Unit 0 calls unit 1; then unit 2 runs; then unit 0 again."""
    a = recorder.enter(0, 0)
    b = recorder.enter(1, 0)
    recorder.exit(b, 0)
    recorder.exit(a, 0)
    c = recorder.enter(2, 0)
    recorder.exit(c, 0)
    again = recorder.enter(0, 0)
    recorder.exit(again, 0)
    return recorder


def test_positions_nest_and_repeat_as_called():
    record = record_nested(Recorder()).record
    assert record.order == [0, 1, 2, 0]
    assert record.ends == [2, 2, 3, 4]


def test_each_unit_gets_the_flops_it_ran_itself_and_nothing_is_counted_between_units():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    recorder = Recorder(count_flops=True)
    outer = recorder.enter(0, 0)
    a @ b  # the outer unit's own matmul: 2 * 8 * 16 * 4
    inner = recorder.enter(1, 0)
    a @ b @ b.T  # the inner unit's: two matmuls of as many FLOPs
    recorder.exit(inner, 0)
    recorder.exit(outer, 0)
    assert not torch._C._len_torch_dispatch_stack(), "no counter runs between units"
    a @ b  # the caller's own code
    again = recorder.enter(2, 0)
    a @ b
    recorder.exit(again, 0)
    recorder.stop()
    assert recorder.record.flops == [2 * 8 * 16 * 4, 2 * 8 * 16 * 4 + 2 * 8 * 4 * 16, 2 * 8 * 16 * 4]


def test_flop_counting_is_exact_and_leaves_results_alone():
    x, w = torch.randn(4, 32), torch.randn(64, 32)
    with FlopCount() as count:
        out = torch.nn.functional.linear(x, w)
    assert count.flops == 2 * 4 * 32 * 64 and torch.equal(out, x @ w.T)


def test_activations_are_memory_grown_beyond_the_weights_held():
    readings = iter([1000, 1500, 1600, 1200])
    recorder = Recorder(memory=lambda: next(readings), held_bytes=100)  # baseline 900: 1000 minus the 100 held
    p = recorder.enter(0, held_bytes=300)  # 1500 - 900 - 300
    recorder.exit(p, held_bytes=300)  # 1600 - 900 - 300
    assert recorder.record.activation_peak_bytes == 400


def test_the_liveness_has_a_weight_per_tensor_over_its_units_spans_and_plans(tmp_path):
    units = meta_units([64, 32, 16], tmp_path)
    record = record_nested(Recorder()).record
    record.flops = [1e6, 2e6, 0.0, 1e6]
    weights = {u.index: bind(u) for u in units}
    liveness = to_liveness(record, weights, [u.name for u in units], activation_peak_bytes=4096, workspace_bytes=0,
                           device=torch.device("cpu"))
    by_name = liveness.name_to_weight
    assert [w.name for w in liveness.weights] == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert by_name["0.weight"].uses == (0, 3) and by_name["0.weight"].spans == ((0, 2), (3, 4)), (
        "unit 0 holds its weights while 1 runs")
    assert by_name["1.bias"].spans == ((1, 2),)
    assert by_name["0.weight"].nbytes == 64 * 64 * 4 and by_name["2.bias"].nbytes == 16 * 4
    assert liveness.flops == (1e6, 2e6, 0.0, 1e6)
    assert liveness.memory_bytes[0] == 64 * 64 * 4 + 64 * 4, "a position reads its unit's weights"
    assert liveness.activation_bytes == (4096,) * 4
    assert liveness.position_names == ("0", "1", "2", "0")
    cost = CostModel.for_device("cpu")
    everything = sum(w.nbytes + 64 for w in liveness.weights) + 4096
    assert schedule(liveness, everything, cost_model=cost, calls=10).resident
    with pytest.raises(vramfx.BudgetError):
        schedule(liveness, 4096 + 32 * 32 * 4, cost_model=cost)


def test_weights_already_on_the_device_take_no_bytes_to_keep():
    """Host tensors are where a CPU computes: kept where they lie, never copied."""
    real = torch.nn.Linear(8, 8)
    with vramfx.skip_model_initialization():
        empty = torch.nn.Linear(8, 8)
    builder = UnitBuilder(empty, vramfx.storage.HostSource(real.state_dict()))
    unit = Unit("0", builder.slots(empty, "", recursive=False, required=False), device=torch.device("cpu"),
                compute_dtypes=(torch.float32,) * 2)
    unit.index = 0
    record = record_nested(Recorder()).record
    record.order, record.ends, record.flops = [0], [1], [0.0]
    liveness = to_liveness(record, {0: bind(unit)}, ["0"], activation_peak_bytes=0, workspace_bytes=0,
                           device=torch.device("cpu"))
    assert [w.nbytes for w in liveness.weights] == [0, 0]
