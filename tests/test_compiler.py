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
