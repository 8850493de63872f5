"""vramfx: run PyTorch models whose weights do not fit in device memory, under a byte budget.

The public API lives here; everything else is an implementation detail. ``compile`` and
``CompiledModule`` are imported on first use: they pull in torch.export and dynamo (seconds),
which ``vramfx inspect`` or loading weights never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vramfx.budget import parse_budget
from vramfx.errors import BudgetError, CaptureError, VramfxError, WeightsError
from vramfx.init import skip_model_initialization
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.storage import DiskMap, load_state_dict
from vramfx.conversion import convert
from vramfx.storage.gguf import GGUFMap
from vramfx.storage.scaled_fp8 import ScaledFP8Map

if TYPE_CHECKING:
    from vramfx.compiled import CompiledModule
    from vramfx.compiler import compile
    from vramfx.pipelines import compile_pipeline
    from vramfx.pretrained import from_pretrained

_LAZY = {
    "compile": "vramfx.compiler",
    "CompiledModule": "vramfx.compiled",
    "compile_pipeline": "vramfx.pipelines",
    "from_pretrained": "vramfx.pretrained",
}

__all__ = [
    "BudgetError",
    "CaptureError",
    "CompiledModule",
    "CostModel",
    "DiskMap",
    "GGUFMap",
    "Plan",
    "ScaledFP8Map",
    "VramfxError",
    "WeightsError",
    "compile",
    "compile_pipeline",
    "convert",
    "from_pretrained",
    "load_state_dict",
    "parse_budget",
    "skip_model_initialization",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vramfx' has no attribute {name!r}")
