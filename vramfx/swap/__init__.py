"""Layer swapping: modules replaced by wrappers that move their weights in around each call.

The same surface as the well-known layer-swap implementation, so switching is a change of
import::

    from vramfx.swap import enable_vram_management, AutoWrappedModule, AutoWrappedLinear

    enable_vram_management(
        model,
        module_map={torch.nn.Linear: AutoWrappedLinear, RMSNorm: AutoWrappedModule},
        vram_config=dict(offload_dtype="disk", offload_device="disk",
                         computation_dtype=torch.bfloat16, computation_device="cuda"),
        vram_limit=6, disk_map=vramfx.DiskMap("model/"),
    )

Unlike the original, ``vram_limit`` is a byte budget vramfx keeps over the weights it holds
(not a check of the device's free memory), the modules kept on the device are chosen by the
planner rather than first come, and the next modules' weights are fetched ahead along the
recorded execution order.
"""

from vramfx.storage.foreign import DiskMap
from vramfx.storage.state_dict import load_state_dict
from vramfx.swap.config import VramConfig
from vramfx.swap.enable import enable_vram_management, offload, onload, swap_stats
from vramfx.swap.runtime import SwapStats
from vramfx.swap.wrappers import AutoWrappedLinear, AutoWrappedModule, AutoWrappedNonRecurseModule

__all__ = [
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "DiskMap",
    "SwapStats",
    "VramConfig",
    "enable_vram_management",
    "load_state_dict",
    "offload",
    "onload",
    "swap_stats",
]
