"""DiffSynth-Studio's fusing LoRA loader on a model whose modules vramfx wraps.

``pipe.load_lora(model, ..., hotload=False)`` fuses a LoRA into the model's weights: its loader finds
each target layer by name in ``model.named_modules()`` and writes ``weight + alpha * (up @ down)``
through the layer's ``load_state_dict``. On a wrapped model both steps miss: a wrapped module's
submodules are named under ``.module`` (no target is found, and the LoRA is silently left out), and
a weight resting on disk has no values to add to. So on a model vramfx wraps the loader's fusion is
done here instead: targets are found by the names they have in the unwrapped model, and each fusion
into a weight a wrapper moves is recorded with that weight (:mod:`vramfx.adapters.fusions`), which
the runtime adds after each fetch with the loader's arithmetic; the stored weights are never
rewritten. Weights outside every wrapper (on the device for good) are fused as the loader fuses them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vramfx.adapters.fusions import Fusion, record_fusion
from vramfx.errors import VramfxError
from vramfx.swap.wrappers import AutoWrappedModule, SwapSwitches

log = logging.getLogger(__name__)

#: The adapter name fusions by the loader are recorded under.
LOADER_ADAPTER = "diffsynth_lora"


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether vramfx wraps ``model`` or any of its modules."""
    return any(isinstance(m, SwapSwitches) for m in model.modules())


def unwrapped_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module of ``model`` by the name it has with no wrapper in between (a wrapper's
    ``.module`` is the wrapper's own name)."""
    names: dict[str, torch.nn.Module] = {}

    def walk(module: torch.nn.Module, name: str) -> None:
        names[name] = module  # a wrapped module takes its wrapper's name
        for attr, child in module.named_children():
            if isinstance(module, AutoWrappedModule) and attr == "module":
                walk(child, name)
            else:
                walk(child, f"{name}.{attr}" if name else attr)

    walk(model, "")
    return names


def fuse_into_wrapped(loader: Any, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], alpha: float) -> int:
    """The loader's ``fuse_lora_to_base_model`` on a wrapped model; returns the layers fused.

    Raises
    ------
    VramfxError
        A target whose weight a wrapper moves cannot take the fusion (not a 2-D weight); nothing
        is fused then.
    """
    lora = loader.convert_state_dict(state_dict)
    targets = sorted(k[: -len(".lora_B.weight")] for k in lora if k.endswith(".lora_B.weight"))
    modules = unwrapped_names(model)
    anchors = {
        (id(holder), local): unit.anchors[i]
        for wrapper in model.modules() if isinstance(wrapper, SwapSwitches)
        for unit in (wrapper._vramfx_unit,)
        for i, slot in enumerate(unit.slots)
        for holder, local in slot.places
    }
    recorded, written, refused = [], [], []
    for name in targets:
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # as the loader: a layer the model does not have is skipped
        up = lora[f"{name}.lora_B.weight"].to(device=loader.device, dtype=loader.torch_dtype)
        down = lora[f"{name}.lora_A.weight"].to(device=loader.device, dtype=loader.torch_dtype)
        anchor = anchors.get((id(module), "weight"))
        if anchor is None:
            written.append((module, up, down))
        elif up.dim() != 2 or tuple(anchor.shape) != (up.shape[0], down.shape[1]):
            refused.append(f"{name} {tuple(anchor.shape)}")
        else:
            recorded.append((anchor, Fusion(LOADER_ADAPTER, down, up, alpha, widen=False)))
    if refused:
        raise VramfxError(
            f"cannot fuse this LoRA into {len(refused)} layer(s) whose weights vramfx moves ({', '.join(refused[:3])}"
            f"{', …' if len(refused) > 3 else ''}): only 2-D (linear) weights take a fusion there. Load it with "
            "hotload=True, or fuse it before enable_vram_management"
        )
    for anchor, fusion in recorded:
        record_fusion(anchor, fusion)
    with torch.no_grad():
        for module, up, down in written:  # on the device for good: fused as the loader fuses them
            state = module.state_dict()
            weight = state["weight"].to(device=loader.device, dtype=loader.torch_dtype)
            state["weight"] = weight + _delta(up, down, alpha)
            module.load_state_dict(state)
    log.info("%d layer(s) fused by LoRA (%d added after each fetch)", len(recorded) + len(written), len(recorded))
    return len(recorded) + len(written)


def _delta(up: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (up @ down)`` as the loader computes it (a 1x1 convolution's factors squeezed first)."""
    if up.dim() == 4:
        return alpha * torch.mm(up.squeeze(3).squeeze(2), down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return alpha * torch.mm(up, down)
