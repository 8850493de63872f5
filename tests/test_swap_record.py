"""The module-order recorder and the Liveness the planner reads from a recorded call."""

from __future__ import annotations

import pytest
import torch

import vramfx
from vramfx.plan.costs import CostModel
from vramfx.plan.schedule import schedule
from vramfx.storage import HostSource
from vramfx.swap.record import Recorder, to_liveness, unit_seconds
from vramfx.swap.units import Unit, UnitBuilder


def meta_units(widths: list[int]) -> list[Unit]:
    """One unit per Linear, parameters meta and stored in host memory (so every call copies)."""
    real = torch.nn.ModuleList(torch.nn.Linear(w, w) for w in widths)
    with vramfx.skip_model_initialization():
        model = torch.nn.ModuleList(torch.nn.Linear(w, w) for w in widths)
    builder = UnitBuilder(model, HostSource(real.state_dict()))
    units = []
    for i, layer in enumerate(model):
        slots = builder.slots(layer, str(i), recursive=False, required=False)
        unit = Unit(str(i), slots, device=torch.device("cpu"), compute_dtypes=(torch.float32,) * 2,
                    prepared_dtypes=(torch.float32,) * 2)
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
    record = record_nested(Recorder(timed=True)).record
    assert record.order == [0, 1, 2, 0]
    assert record.ends == [2, 2, 3, 4]
    assert all(s >= 0 for s in record.seconds) and set(unit_seconds(record)) == {0, 1, 2}


def test_activations_are_memory_grown_beyond_the_weights_held():
    readings = iter([1000, 1500, 1600, 1200])
    recorder = Recorder(memory=lambda: next(readings))  # baseline 1000
    p = recorder.enter(0, held_bytes=300)  # 1500 - 1000 - 300
    recorder.exit(p, held_bytes=300)  # 1600 - 1000 - 300
    assert recorder.record.activation_peak_bytes == 300


def test_the_liveness_spans_callees_and_plans():
    units = meta_units([64, 32, 16])
    record = record_nested(Recorder()).record
    liveness = to_liveness(record.order, record.ends, units, seconds={0: 1e-3, 1: 2e-3}, alignment=64,
                           activation_peak_bytes=4096, flops_per_s=1e9)
    by_name = liveness.name_to_weight
    assert [w.name for w in liveness.weights] == ["0", "1", "2"]
    assert by_name["0"].uses == (0, 3) and by_name["0"].spans == ((0, 2), (3, 4)), "unit 0 holds its weights while 1 runs"
    assert by_name["1"].spans == ((1, 2),)
    assert by_name["0"].nbytes == units[0].stream_bytes(64) == 64 * 64 * 4 + 256
    assert liveness.flops == (1e6, 2e6, pytest.approx(1.5e6), 1e6), "an untimed unit takes the mean"
    assert liveness.activation_bytes == (4096,) * 4
    assert liveness.position_names == ("0", "1", "2", "0")
    cost = CostModel.for_device("cpu")
    everything = sum(w.nbytes for w in liveness.weights) + 4096
    assert schedule(liveness, everything, cost_model=cost, calls=10).resident
    with pytest.raises(vramfx.BudgetError):
        schedule(liveness, 4096 + units[1].stream_bytes(64), cost_model=cost)
