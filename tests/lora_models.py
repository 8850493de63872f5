"""Tiny Flux, Wan and Llama models with PEFT LoRA adapters, eager and empty twins, for the adapter tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tiny_models import ARCHS, Arch, build_empty, build_saved


def _llama_lm() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


#: Each model with the layers its LoRAs target.
LORA_ARCHS: dict[str, tuple[Arch, list[str]]] = {
    "flux": (ARCHS["flux"], ["to_q", "to_k", "to_v", "proj_out"]),
    "wan": (ARCHS["wan"], ["to_q", "to_v", "ffn.net.2"]),
    "llama": (Arch("llama_lm", _llama_lm, ARCHS["llama"].inputs), ["q_proj", "v_proj", "down_proj"]),
}


@dataclass
class Twins:
    """An eager model and an empty twin whose weights are in ``folder``."""

    eager: torch.nn.Module
    empty: torch.nn.Module
    inputs: dict[str, Any]
    folder: Path
    targets: list[str]

    def expected(self) -> Any:
        with torch.no_grad():
            return self.eager(**self.inputs)


def twins(name: str, folder: Path) -> Twins:
    arch, targets = LORA_ARCHS[name]
    return Twins(build_saved(arch, folder), build_empty(arch), arch.inputs(), folder, targets)


def lora_config(targets: list[str], r: int = 4, alpha: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)


def add_lora(models: list[torch.nn.Module], targets: list[str], name: str, seed: int, r: int = 4) -> None:
    """The same random LoRA ``name`` added to every model (values copied from the first): by the
    model's own ``add_adapter`` (diffusers), else by PEFT's ``inject_adapter_in_model``."""
    from peft import inject_adapter_in_model

    for model in models:
        torch.manual_seed(seed)
        if hasattr(model, "load_lora_adapter"):
            model.add_adapter(lora_config(targets, r=r), adapter_name=name)
        else:
            inject_adapter_in_model(lora_config(targets, r=r), unwrapped(model), adapter_name=name)
    values = {k: v for k, v in unwrapped(models[0]).state_dict().items() if f".{name}." in k and "lora_" in k}
    for model in models[1:]:
        unwrapped(model).load_state_dict(values, strict=False)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a compiled model wraps (its module tree), or the model itself."""
    import vramfx

    return model.model if isinstance(model, vramfx.CompiledModule) else model


def lora_state_dict(arch_name: str, name: str, seed: int, r: int = 4, prefix: str = "") -> dict[str, torch.Tensor]:
    """A LoRA in the diffusers/PEFT file format (``X.lora_A.weight``), as ``load_lora_weights`` reads."""
    from peft.utils import get_peft_model_state_dict

    arch, targets = LORA_ARCHS[arch_name]
    torch.manual_seed(seed)
    model = arch.build()
    model.add_adapter(lora_config(targets, r=r, alpha=r), adapter_name=name)
    return {prefix + k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


class Counter:
    """Counts captures and plans made by ``vramfx.compile`` (monkeypatched in)."""

    def __init__(self, monkeypatch) -> None:
        import vramfx.capture_cache as capture_cache
        import vramfx.compiler as compiler

        self.captures = 0
        self.plans = 0
        capture, plan = capture_cache.capture, compiler.cached_plan

        def counted_capture(*a: Any, **k: Any) -> Any:
            self.captures += 1
            return capture(*a, **k)

        def counted_plan(*a: Any, **k: Any) -> Any:
            self.plans += 1
            return plan(*a, **k)

        monkeypatch.setattr(capture_cache, "capture", counted_capture)
        monkeypatch.setattr(compiler, "cached_plan", counted_plan)

    @property
    def made(self) -> tuple[int, int]:
        return self.captures, self.plans


def first(output: Any) -> torch.Tensor:
    """The main tensor of a model's output (a tuple, a ModelOutput or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def assert_equal(expected: Any, actual: Any) -> None:
    assert torch.equal(first(expected), first(actual)), "output differs from eager"


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_active(model: torch.nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """PEFT's layer-level ``set_adapter`` and ``set_scale``, on every LoRA layer."""
    for layer in lora_layers(model):
        layer.set_adapter(names)
        for name, weight in zip(names, weights or []):
            layer.set_scale(name, weight)


def delete_adapter(model: torch.nn.Module, name: str) -> None:
    """The model's own ``delete_adapters`` (diffusers), else PEFT's layer-level ``delete_adapter``."""
    if hasattr(model, "delete_adapters"):
        model.delete_adapters([name])
        return
    for layer in lora_layers(model):
        layer.delete_adapter(name)
