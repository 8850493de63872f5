"""Which stored key holds each of a model's tensors: tied names, and checkpoints saved in an older layout.

transformers 5 renamed many modules (ViT's ``attention.attention.query`` became
``attention.q_proj``) but still saves and loads hub checkpoints in their original names, renaming
on load. vramfx streams stored tensors by name, so it applies the same renaming rules, taken from
transformers itself, and the usual base-model prefix add/strip (a ``LlamaForCausalLM`` checkpoint
feeding a ``LlamaModel``). For any model, a prefix every stored key carries (a single file saved
from a wrapper: ``model.diffusion_model.``, ``transformer.``, ``model.``) is found from the names
and stripped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)


def checkpoint_key_map(model: torch.nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Model state-dict name → checkpoint key, for keys whose names differ.

    Parameters
    ----------
    model:
        The model the checkpoint feeds. Only transformers ``PreTrainedModel`` subclasses have
        renaming rules; for any other model the map is empty.
    checkpoint_keys:
        The keys stored in the checkpoint.

    Returns
    -------
    dict
        Only the names that differ; a key that transformers would fuse or split on load (a
        converter, not a rename) is left out, so it reports as missing rather than wrong.

    Examples
    --------
    >>> checkpoint_key_map(torch.nn.Linear(1, 1), ["weight"])
    {}
    >>> checkpoint_key_map(torch.nn.Linear(1, 1), ["model.diffusion_model.weight", "model.diffusion_model.bias"])
    {'weight': 'model.diffusion_model.weight', 'bias': 'model.diffusion_model.bias'}
    """
    checkpoint_keys = list(checkpoint_keys)
    out = _transformers_key_map(model, checkpoint_keys)
    stored = set(checkpoint_keys)
    missing = [n for n in model.state_dict(keep_vars=True) if n not in stored and n not in out]
    prefix = stored_prefix(missing, checkpoint_keys)
    if prefix:
        log.info("the checkpoint's keys carry the prefix %r; it is stripped", prefix)
        out.update({n: prefix + n for n in missing if prefix + n in stored})
    return out


def stored_prefix(names: Iterable[str], checkpoint_keys: Iterable[str]) -> str | None:
    """The prefix the checkpoint stores most of ``names`` under (``"model.diffusion_model."``), or None.

    Examples
    --------
    >>> stored_prefix(["a.weight", "b.weight"], ["transformer.a.weight", "transformer.b.weight", "other"])
    'transformer.'
    """
    names = list(names)
    if not names:
        return None
    keys = list(checkpoint_keys)
    stored = set(keys)
    counts: dict[str, int] = {}
    for name in names[:16]:  # a sample finds the candidates; all names count them
        for key in keys:
            if key.endswith("." + name):
                counts.setdefault(key[: -len(name)], 0)
    for prefix in counts:
        counts[prefix] = sum(prefix + n in stored for n in names)
    best = max(counts, key=counts.__getitem__, default=None)
    return best if best is not None and counts[best] * 2 >= len(names) else None


def _transformers_key_map(model: torch.nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """transformers' load-time renames of ``checkpoint_keys`` to ``model``'s names."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return {}
    if not isinstance(model, PreTrainedModel):
        return {}
    model_keys = {name: True for name, _ in model.state_dict(keep_vars=True).items()}
    model_keys.update({adapter_free_name(name): True for name in model_keys})
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = _transformers_renamer(model, prefix, model_keys)
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        name = rename(key)
        if name is not None and name != key and name in model_keys and name not in out:
            out[name] = key
    return out


def _transformers_renamer(model, prefix: str, model_keys: dict[str, bool]):
    """transformers' own load-time renaming, or a base-model prefix fix where it has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no renaming rules, only the prefix
        return lambda key: _fix_prefix(key, prefix, model_keys)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str | None:
        name, converter = rename_source_key(key, renamings, converters, prefix or None, model_keys)
        return None if converter is not None else name

    return rename


def _fix_prefix(key: str, prefix: str, model_keys: dict[str, bool]) -> str:
    if not prefix:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in model_keys:
        return key[len(prefix) + 1 :]
    if f"{prefix}.{key}" in model_keys:
        return f"{prefix}.{key}"
    return key


def tensor_aliases(model: torch.nn.Module) -> dict[int, tuple[str, ...]]:
    """Every state-dict name of each parameter and buffer, grouped by tensor identity."""
    names: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(t), []).append(name)
    return {k: tuple(v) for k, v in names.items()}


#: What a PEFT model's names add to the base model's: the wrapper ``get_peft_model`` puts around
#: the model, and the ``base_layer`` a LoRA layer keeps the wrapped layer under.
_PEFT_MODEL_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer."


def adapter_free_name(name: str) -> str:
    """The name a tensor of an adapter-wrapped model had before the adapter was added, which is
    the name the base checkpoint stores it under (``X.base_layer.weight`` is stored as
    ``X.weight``). Weight binding (:func:`vramfx.weights.find_key`) tries it after a tensor's own
    names; checkpoint renaming maps it too.

    Examples
    --------
    >>> adapter_free_name("blocks.0.attn.to_q.base_layer.weight")
    'blocks.0.attn.to_q.weight'
    >>> adapter_free_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.bias")
    'model.layers.0.mlp.up_proj.bias'
    """
    name = name.removeprefix(_PEFT_MODEL_PREFIX)
    while _BASE_LAYER in name:
        name = name.replace(_BASE_LAYER, ".")
    return name
