"""``load_state_dict`` on a wrapped model: the values loaded become the weights the runtime serves.

Between calls a wrapped module holds stand-ins (meta tensors, or its weights where they rest), so
torch's own loading would copy into a stand-in (a no-op with a warning: the model would keep
computing on its old weights) or into a copy the runtime no longer reads. Instead each wrapper
takes its parameters' entries out of the state dict and makes them the parameters' new values where
they rest (host or device memory, in their resting dtype); the runtime then drops what it kept of the
old ones and plans again. Weights resting on disk (read from ``disk_map``) cannot take new values:
loading into them is refused, and so is a shape that differs from the parameter's.
"""

from __future__ import annotations

from typing import Any

import torch

from vramfx.swap.runtime import SwapRuntime
from vramfx.swap.units import Unit


def honour_load_state_dict(wrapper: torch.nn.Module, unit: Unit, runtime: SwapRuntime) -> None:
    """Make ``wrapper.load_state_dict`` (and a parent's) set ``unit``'s weights."""
    places = {(id(module), local): i for i, slot in enumerate(unit.slots) for module, local in slot.places}
    keys = {
        f"{prefix}.{local}" if prefix else local: places[(id(module), local)]
        for prefix, module in wrapper.named_modules(remove_duplicate=False)
        for local in module._parameters
        if (id(module), local) in places
    }
    taken: list[str] = []

    def take(module: Any, state_dict: dict, prefix: str, _metadata: Any, _strict: bool, _missing: list,
             _unexpected: list, error_msgs: list) -> None:
        moved = False
        for key, i in keys.items():
            value = state_dict.pop(prefix + key, None)
            if value is None:
                continue
            taken.append(prefix + key)
            slot, home = unit.slots[i], unit.home[i]
            if tuple(value.shape) != slot.shape:
                error_msgs.append(f"size mismatch for {prefix + key}: copying a param with shape "
                                  f"{tuple(value.shape)}, the parameter in the model has shape {slot.shape}")
            elif home is None:
                error_msgs.append(f"{prefix + key} rests on disk (read from disk_map), which cannot take new "
                                  "values; onload() the module first, or pass a disk_map holding them")
            else:
                with torch.no_grad():
                    unit.set_home(i, value.detach().to(device=home.device, dtype=home.dtype, copy=True))
                moved = True
        if moved:
            runtime.homes_changed()

    def untake(_module: Any, incompatible: Any) -> None:
        missing = set(taken)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in missing]
        taken.clear()

    wrapper.register_load_state_dict_pre_hook(take)
    wrapper.register_load_state_dict_post_hook(untake)
