"""compile's choices per device: the link bandwidth a plan assumes, by where weights are stored."""

from __future__ import annotations

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
        fast = vramfx.compile(build_empty(arch), budget="12MiB", weights=tmp_path, device="cpu",
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
