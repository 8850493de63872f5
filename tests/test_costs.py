"""The cost model: formulas, fixed defaults per device, calibration."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from vramfx.plan.costs import CostModel


def test_node_seconds_is_bound_by_compute_or_memory_plus_overhead():
    cm = CostModel(
        compute_flops_per_s=1e9,
        memory_bytes_per_s=1e8,
        link_bytes_per_s=1e6,
        link_latency_s=1e-3,
        node_overhead_s=1e-6,
    )
    assert cm.node_seconds(2e9, 10**6) == pytest.approx(2.0 + 1e-6)  # compute bound
    assert cm.node_seconds(1e3, 10**8) == pytest.approx(1.0 + 1e-6)  # memory bound
    assert cm.node_seconds(0.0, 0) == pytest.approx(1e-6)
    assert cm.transfer_seconds(10**6) == pytest.approx(1.0 + 1e-3)
    assert cm.transfer_seconds(0) == pytest.approx(1e-3)


def test_for_device_is_fixed_and_reproducible():
    assert CostModel.for_device("cpu") == CostModel.for_device(torch.device("cpu"))
    cuda = CostModel.for_device("cuda:1")
    assert cuda == CostModel.for_device(torch.device("cuda", 0))
    assert cuda.compute_flops_per_s > CostModel.for_device("cpu").compute_flops_per_s
    assert cuda.link_bytes_per_s == 20e9
    cpu = CostModel.for_device("cpu")
    assert (cpu.compute_flops_per_s, cpu.memory_bytes_per_s, cpu.link_bytes_per_s) == (
        50e9,
        10e9,
        4e9,
    )
    assert cpu.node_overhead_s == 5e-6


def test_for_device_link_override():
    slow_disk = CostModel.for_device("cuda", link_bytes_per_s=5e8)
    assert slow_disk.link_bytes_per_s == 5e8
    assert slow_disk.compute_flops_per_s == CostModel.for_device("cuda").compute_flops_per_s


def test_for_device_unknown_type_names_the_device():
    with pytest.raises(ValueError, match="'tpu'"):
        CostModel.for_device("tpu")


def test_dict_round_trip():
    cm = CostModel.for_device("cpu")
    data = cm.to_dict()
    assert set(data) == {
        "compute_flops_per_s",
        "memory_bytes_per_s",
        "disk_bytes_per_s",
        "link_bytes_per_s",
        "copy_interference",
        "copy_slowdown",
        "link_latency_s",
        "node_overhead_s",
    }
    assert all(isinstance(v, float) for v in data.values())
    assert CostModel.from_dict(data) == cm


@pytest.mark.parametrize(
    ("field", "value"),
    [("compute_flops_per_s", 0.0), ("link_bytes_per_s", -1.0), ("link_latency_s", -1e-6)],
)
def test_invalid_values_are_rejected_by_name(field, value):
    args = CostModel.for_device("cpu").to_dict() | {field: value}
    with pytest.raises(ValueError, match=field):
        CostModel(**args)


def test_calibrate_on_cpu_measures_plausible_numbers():
    cm = CostModel.calibrate("cpu", link_bytes_per_s=1e9)
    assert cm.link_bytes_per_s == 1e9
    assert cm.link_latency_s == CostModel.for_device("cpu").link_latency_s
    for value in (cm.compute_flops_per_s, cm.memory_bytes_per_s, cm.node_overhead_s):
        assert math.isfinite(value) and value > 0
    # Very loose sanity bounds: any machine that runs the tests lies far inside them.
    assert 1e7 < cm.compute_flops_per_s < 1e15
    assert 1e7 < cm.memory_bytes_per_s < 1e13
    # A copy beside the kernels, measured: bounded, and never faster than alone.
    assert 0.0 <= cm.copy_interference <= 4.0
    assert 1.0 <= cm.copy_slowdown <= 8.0


@pytest.mark.cuda
def test_calibrate_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cm = CostModel.calibrate("cuda")
    assert cm.compute_flops_per_s > 1e11
    assert cm.link_bytes_per_s == CostModel.for_device("cuda").link_bytes_per_s


def test_copy_interference_makes_streamed_copies_cost_compute_time():
    cpu = CostModel.for_device("cpu")
    assert cpu.copy_interference == 1.0, "a CPU copy takes a core from compute that uses them all"
    assert CostModel.for_device("cuda").copy_interference < 0.1, "a copy engine does not take SMs"
    with pytest.raises(ValueError, match="copy_interference"):
        CostModel(1e9, 1e9, 1e9, copy_interference=-1.0)


def test_copy_slowdown_prices_copies_beside_the_kernels_and_not_direct_reads():
    from vramfx.plan.reads import _priced

    cm = dataclasses.replace(CostModel.for_device("cpu"), copy_slowdown=2.0)
    assert cm.transfer_seconds(4 * 10**9) == pytest.approx(2.0 + cm.link_latency_s)
    with pytest.raises(ValueError, match="copy_slowdown"):
        dataclasses.replace(cm, copy_slowdown=0.0)
    # O_DIRECT's copy is the disk controller's: no core slowed, none taken.
    direct = _priced(cm, "direct", miss=1.0)
    assert (direct.copy_slowdown, direct.copy_interference) == (1.0, 0.0)
    # A buffered copy that also waits for the disk folds the slowdown into its rate; only the
    # copying share of its time takes compute.
    buffered = _priced(cm, "copy", miss=0.5)
    per_byte = 2.0 / cm.link_bytes_per_s + 0.5 / cm.disk_bytes_per_s
    assert buffered.transfer_seconds(10**9) == pytest.approx(10**9 * per_byte + cm.link_latency_s)
    assert buffered.copy_interference == pytest.approx(cm.copy_interference * (2.0 / cm.link_bytes_per_s) / per_byte)


@pytest.mark.parametrize("link", ["fast", float("nan"), float("inf"), 0, -1.0, True])
def test_a_link_bandwidth_that_is_no_positive_number_is_refused_by_name(link):
    with pytest.raises(ValueError, match="link_bytes_per_s must be a positive, finite number"):
        CostModel.for_device("cpu", link_bytes_per_s=link)


def test_calibrate_names_a_device_it_has_no_defaults_for():
    with pytest.raises(ValueError, match="no defaults for device 'gpu'"):
        CostModel.calibrate("gpu")


def test_a_rate_prices_its_kind_of_kernel_and_others_keep_the_default():
    cm = CostModel(compute_flops_per_s=1e9, memory_bytes_per_s=1e12, link_bytes_per_s=1e9, link_latency_s=0.0,
                   node_overhead_s=0.0, rates={"matmul:bfloat16": 0.25e9})
    assert cm.node_seconds(1e9, 0, "matmul:bfloat16") == pytest.approx(4.0)
    assert cm.node_seconds(1e9, 0, "matmul:float32") == pytest.approx(1.0)
    assert cm.node_seconds(1e9, 0) == pytest.approx(1.0)
    assert CostModel.from_dict(cm.to_dict()) == cm
    assert json.loads(json.dumps(cm.to_dict()))["rates"] == {"matmul:bfloat16": 0.25e9}
    with pytest.raises(ValueError, match="rate 'conv:float32'"):
        CostModel(compute_flops_per_s=1e9, memory_bytes_per_s=1e9, link_bytes_per_s=1e9, rates={"conv:float32": 0})


def test_calibrate_measures_each_kernel_kind_per_dtype():
    cm = CostModel.calibrate("cpu", dtypes=(torch.float32, torch.bfloat16), repeats=2)
    assert {k for k, _ in cm.rates} == {f"{kind}:{dtype}" for kind in ("matmul", "conv", "attention", "memory")
                                        for dtype in ("float32", "bfloat16")}
    assert cm.compute_flops_per_s == dict(cm.rates)["matmul:float32"]
    assert cm.memory_bytes_per_s == dict(cm.rates)["memory:float32"]


def test_liveness_records_kernel_kinds_and_dtypes_the_schedule_prices():
    from vramfx.capture import capture
    from vramfx.plan.liveness import build_liveness
    from vramfx.plan.schedule import schedule

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(torch.bfloat16)
    live = build_liveness(capture(model, (torch.ones(8, 64, dtype=torch.bfloat16),)))
    assert live.op_classes == ("matmul:bfloat16", "memory:bfloat16")
    base = dict(compute_flops_per_s=1e9, memory_bytes_per_s=1e12, link_bytes_per_s=1e9)
    fast = schedule(live, 2**24, cost_model=CostModel(**base))
    slow = schedule(live, 2**24, cost_model=CostModel(**base, rates={"matmul:bfloat16": 1e6}))
    assert slow.predicted.compute_seconds > 10 * fast.predicted.compute_seconds
    # GELU is memory-bound: priced at the bf16 memory rate when one is given.
    slow_memory = schedule(live, 2**24, cost_model=CostModel(**base, rates={"memory:bfloat16": 1e3}))
    assert slow_memory.predicted.compute_seconds > 10 * fast.predicted.compute_seconds
