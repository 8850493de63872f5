"""What a captured graph assumed about the model, to tell when the model has changed since.

A graph is captured from the model as it was: its parameters and buffers (which tensor, dtype,
shape, device, and for real tensors their values' version), its submodules, their hooks and the
global module hooks, and its mode. Pipelines and users change these after ``compile`` (a
processor set, a hook registered, a parameter replaced, ``model.half()``); a graph that ignored
that would silently compute the old model. So each call compares a cheap snapshot with the one
its graphs were captured under; on a difference the graphs are dropped and captured again, and
a change that cannot be honoured (training mode) is refused.

Examples
--------
>>> model = torch.nn.Linear(2, 2).eval()
>>> before = snapshot(model)
>>> changed(before, snapshot(model)) is None
True
>>> model.weight = torch.nn.Parameter(torch.zeros(2, 2))
>>> changed(before, snapshot(model))
'parameter weight was replaced or changed'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.modules import module as nn_module

from vramfx.adapters.state import is_adapter_layer

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")


@dataclass(frozen=True)
class Snapshot:
    """The model as a graph captured from it saw it. ``tensors``: (name, identity, dtype, shape,
    device, version of a real tensor's values; not ``requires_grad``: calls run without grad, and
    adapters freeze their base layers); ``modules``: (name, identity, class, hooks);
    ``training``: names of modules in training mode."""

    tensors: tuple
    modules: tuple
    global_hooks: tuple
    training: tuple[str, ...]


def snapshot(model: torch.nn.Module) -> Snapshot:
    """The parts of ``model`` a captured graph depends on, cheaply (no tensor data is read)."""
    tensors = []
    modules = []
    training = []
    adapter_parts: list[str] = []  # prefixes of the adapters' own modules
    for full_name, module in model.named_modules(remove_duplicate=False):
        if any(f"{full_name}.".startswith(p) for p in adapter_parts):
            continue
        if is_adapter_layer(module):
            # An adapter layer wraps the model's own layer as ``base_layer``: the snapshot sees
            # that layer under its own name, and the adapters' structure and values are followed
            # apart (vramfx.adapters: keyed graphs, values refreshed per call), so adding, swapping
            # or unloading an adapter costs no capture of the base model.
            adapter_parts += [f"{full_name}.{child}." for child, _ in module.named_children() if child != "base_layer"]
            continue
        name = full_name.replace(".base_layer", "")
        attrs = module.__dict__
        hooks = tuple(tuple(attrs[d]) if d in attrs else () for d in _HOOK_DICTS)
        processor = attrs.get("processor")  # a diffusers attention's processor (set_attn_processor)
        modules.append((name, id(module), type(module), hooks, None if processor is None else id(processor)))
        if module.training:
            training.append(name or "<root>")
        for kind, store in (("parameter", module._parameters), ("buffer", module._buffers)):
            for local, t in store.items():
                if t is None:
                    tensors.append((kind, name, local, None))
                else:
                    version = None if t.is_meta else t._version
                    tensors.append((kind, name, local, id(t), t.dtype, t.shape, t.device, version))
    global_hooks = tuple(tuple(getattr(nn_module, g, {}).keys()) for g in _GLOBAL_HOOKS)
    return Snapshot(tuple(tensors), tuple(modules), global_hooks, tuple(training))


def changed(before: Snapshot, now: Snapshot) -> str | None:
    """What differs between two snapshots, in words (the first difference found), or None."""
    if before == now:
        return None
    if before.tensors != now.tensors:
        old = {t[:3]: t for t in before.tensors}
        for t in now.tensors:
            if old.get(t[:3]) != t:
                return f"{t[0]} {t[1] + '.' if t[1] else ''}{t[2]} was replaced or changed"
        return "parameters or buffers were removed"
    if before.global_hooks != now.global_hooks:
        return "a global module hook was registered or removed"
    if before.modules != now.modules:
        old = {m[0]: m for m in before.modules}
        for m in now.modules:
            was = old.get(m[0])
            if was is None or was[1:3] != m[1:3]:
                return f"submodule {m[0] or '<root>'} was added or replaced"
            if was[3] != m[3]:
                return f"hooks of {m[0] or '<root>'} changed"
            if was[4] != m[4]:
                return f"the attention processor of {m[0] or '<root>'} changed"
        return "submodules were removed"
    return "the training mode changed"
