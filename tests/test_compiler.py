"""compile's choices per device: the link bandwidth a plan assumes, by where weights are stored."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import vramfx
from vramfx.compiler import CUDA_LINK_BYTES_PER_S, link_bytes_per_s
from vramfx.plan.costs import CostModel
from vramfx.weights import as_source


def test_cuda_plans_assume_pcie_for_host_weights_and_the_slower_disk_for_a_diskmap(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(4)}, tmp_path / "w.safetensors")
    cuda = torch.device("cuda", 0)
    disk = vramfx.DiskMap(tmp_path)
    assert link_bytes_per_s(cuda, disk) == min(CUDA_LINK_BYTES_PER_S["host"], CUDA_LINK_BYTES_PER_S["disk"])
    assert link_bytes_per_s(cuda, as_source({"w": torch.ones(4)})) == CUDA_LINK_BYTES_PER_S["host"]
    assert link_bytes_per_s(cuda, None) == CUDA_LINK_BYTES_PER_S["host"], "the model's own tensors are host memory"
    assert link_bytes_per_s(torch.device("cpu"), disk) is None


def test_cpu_plans_keep_the_cpu_link(tmp_path):
    safetensors.torch.save_file({"weight": torch.ones(4, 4), "bias": torch.ones(4)}, tmp_path / "w.safetensors")
    with vramfx.skip_model_initialization():
        model = torch.nn.Linear(4, 4)
    fast = vramfx.compile(model, budget="1GB", weights=tmp_path, device="cpu", example_args=(torch.ones(1, 4),))
    assert fast.plan.cost_model["link_bytes_per_s"] == CostModel.for_device("cpu").link_bytes_per_s


def test_the_same_model_inputs_and_budget_give_the_same_plan_whatever_the_machine_does(tmp_path):
    """No calibration unless asked for: the default cost model is the device type's fixed figures."""
    from tiny_models import ARCHS, build_empty, build_saved

    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    plans = []
    for _ in range(2):
        fast = vramfx.compile(build_empty(arch), budget="14MiB", weights=tmp_path, device="cpu",
                              example_kwargs=arch.inputs())
        plans.append(fast.plan)
    assert plans[0] == plans[1]
    assert plans[0].cost_model == CostModel.for_device("cpu").to_dict()


def test_layer_swap_plans_come_from_counted_flops_not_timings(tmp_path):
    from tiny_models import ARCHS, build_empty, build_saved
    from vramfx.swap import AutoWrappedLinear, enable_vram_management

    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    plans = []
    for _ in range(2):
        model = enable_vram_management(build_empty(arch), {torch.nn.Linear: AutoWrappedLinear},
                                       dict(offload_device="disk", computation_device="cpu"), vram_limit="40KiB",
                                       disk_map=vramfx.DiskMap(tmp_path))
        with torch.no_grad():
            model(**arch.inputs())
        runtime = model.__dict__["_vramfx_swap"].runtime
        plans.append(runtime._planned.plan)
    assert plans[0] is not None and plans[0] == plans[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calls": "10"}, TypeError, r"calls must be an int >= 1, got '10' \(str\)"),
        ({"calls": 0}, ValueError, r"calls must be an int >= 1, got 0"),
        ({"margin_bytes": "8MB"}, TypeError, r"margin_bytes must be an int >= 0, got '8MB'"),
        ({"margin_bytes": float("nan")}, TypeError, r"margin_bytes must be an int >= 0, got nan \(float\)"),
        ({"keep_in_compute_dtype": 42, "storage_dtype": torch.float16}, ValueError, r"keep_in_compute_dtype takes .* got 42"),
        ({"example_args": torch.ones(2, 4)}, TypeError, r"example_args must be a tuple .* e\.g\. example_args=\(x,\); got a Tensor"),
        ({"example_kwargs": [torch.ones(2, 4)]}, TypeError, r"example_kwargs must be a dict"),
        ({"bypass_page_cache": "yes"}, TypeError, r"bypass_page_cache must be True or False"),
        ({"device": "gpu"}, ValueError, r"device='gpu' is not a device"),
        ({"device": 1.5}, TypeError, r"device must be a torch.device or a string"),
        ({"cost_model": "fast"}, TypeError, r"cost_model must be a vramfx.CostModel"),
        ({"storage_dtype": "fp8"}, ValueError, r"storage_dtype must be one of"),
        ({"budget": float("inf")}, ValueError, r"budget=inf has type float"),
    ],
)
def test_every_argument_is_checked_up_front_and_named(kwargs, error, match):
    options = {"budget": "10MiB", "device": "cpu", **kwargs}
    with pytest.raises(error, match=match):
        vramfx.compile(torch.nn.Linear(4, 4), **options)


def test_a_model_that_is_no_module_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        vramfx.compile(lambda x: x, budget="10MiB", device="cpu")


def test_link_bytes_per_s_times_reads_of_the_largest_weights(tmp_path):
    from vramfx.measure import link_bytes_per_s as measured

    safetensors.torch.save_file({"a": torch.ones(256, 256), "b": torch.ones(4)}, tmp_path / "w.safetensors")
    with vramfx.DiskMap(tmp_path) as disk:
        assert measured(disk) > 0 and measured(disk, bypass_page_cache=True) > 0
