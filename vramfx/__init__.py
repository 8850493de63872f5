"""vramfx: run PyTorch models whose weights do not fit in device memory, under a byte budget.

The public API lives here; everything else is an implementation detail.
"""

from vramfx.budget import parse_budget
from vramfx.compiled import CompiledModule
from vramfx.compiler import compile
from vramfx.errors import BudgetError, CaptureError, VramfxError, WeightsError
from vramfx.init import skip_model_initialization
from vramfx.plan.costs import CostModel
from vramfx.plan.plan import Plan
from vramfx.storage import DiskMap, load_state_dict
from vramfx.storage.convert import convert

__all__ = [
    "BudgetError",
    "CaptureError",
    "CompiledModule",
    "CostModel",
    "DiskMap",
    "Plan",
    "VramfxError",
    "WeightsError",
    "compile",
    "convert",
    "load_state_dict",
    "parse_budget",
    "skip_model_initialization",
]
