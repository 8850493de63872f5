"""The runtime: engines that run a Plan's steps on a device, for either front end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vramfx.plan.plan import Plan
    from vramfx.runtime.engine import Engine, ResidentStore
    from vramfx.storage.ref import WeightRef


def make_engine(
    plan: "Plan",
    refs: Mapping[str, "WeightRef"],
    device: torch.device,
    store: "ResidentStore",
    *,
    bypass_page_cache: bool = False,
) -> "Engine":
    """The engine for ``device``: a reader thread on CPU, a copy stream and staging ring on CUDA."""
    if device.type == "cpu":
        from vramfx.runtime.cpu import CpuEngine

        return CpuEngine(plan, refs, device, store, bypass_page_cache=bypass_page_cache)
    if device.type == "cuda":
        from vramfx.runtime.cuda import CudaEngine

        return CudaEngine(plan, refs, device, store, bypass_page_cache=bypass_page_cache)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
