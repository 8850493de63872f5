"""Layer swapping: modules replaced by wrappers that move their weights in around each call.

The same surface as DiffSynth-Studio's ``diffsynth.core.vram`` (the well-known layer-swap
implementation), so switching is a change of import: its module maps, wrapper classes, states,
``DiskMap`` call style and ``load_state_dict`` calls work as they are::

    from vramfx.swap import enable_vram_management, AutoWrappedModule, AutoWrappedLinear, DiskMap

    enable_vram_management(
        model,
        module_map={torch.nn.Linear: AutoWrappedLinear, RMSNorm: AutoWrappedModule},
        vram_config=dict(offload_dtype="disk", offload_device="disk",
                         computation_dtype=torch.bfloat16, computation_device="cuda"),
        vram_limit=6, disk_map=DiskMap("model.safetensors", "cuda"),
    )

Unlike the original, ``vram_limit`` is a byte budget vramfx keeps over the weights it holds
(not a ceiling on the device memory in use), the weights kept on the device are chosen by the
planner rather than first come, and the next modules' weights are fetched ahead along the
recorded execution order — also when a pipeline calls the model's modules without its forward
(:mod:`vramfx.swap.passes`).
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
