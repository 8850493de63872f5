"""A diffusers pipeline folder read without its weights: ``model_index.json`` and one folder per
component.

Components with weights (``nn.Module``s) are built from their configs with meta parameters, in
the dtype their config or checkpoint states; tokenizers, schedulers and processors are loaded as
diffusers would, from the folder (nothing is downloaded).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vramfx.init import skip_model_initialization

@dataclass(frozen=True)
class PipelineIndex:
    """What ``model_index.json`` says: the pipeline class's name, each component's
    ``(library, class name)`` (``None`` for an empty slot), and the other constructor values."""

    class_name: str
    components: dict[str, tuple[str, str] | None]
    settings: dict[str, Any]


def read_index(root: str | os.PathLike) -> PipelineIndex:
    """Read ``root/model_index.json``.

    Raises
    ------
    ValueError
        ``root`` is not a folder with a ``model_index.json`` diffusers wrote.
    """
    path = Path(root) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"root={str(root)!r} has no model_index.json; pass the folder a diffusers pipeline was saved to")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    components: dict[str, tuple[str, str] | None] = {}
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2:
            components[key] = None if value[0] is None else (str(value[0]), str(value[1]))
        else:
            settings[key] = value
    return PipelineIndex(str(data.get("_class_name", "")), components, settings)


def component_class(library: str, class_name: str) -> type:
    """The class ``model_index.json`` names for a component."""
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"model_index.json names {library}.{class_name}, which {library} does not have")
    return cls


def build_empty(cls: type, folder: Path) -> torch.nn.Module:
    """``cls`` built from the config in ``folder`` with meta parameters, in its stored dtype."""
    if hasattr(cls, "config_class") and hasattr(cls.config_class, "from_pretrained"):  # transformers
        config = cls.config_class.from_pretrained(folder)
        with skip_model_initialization():
            model = cls(config)
    else:  # diffusers
        config = cls.load_config(folder)
        with skip_model_initialization():
            model = cls.from_config(config)
    dtype = stored_dtype(folder)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype most of ``folder``'s safetensors bytes are stored in, or None."""
    from vramfx.storage.diskmap import DiskMap

    totals: dict[torch.dtype, int] = {}
    with DiskMap(folder) as weights:
        for key in weights:
            info = weights.info(key)
            if info.dtype.is_floating_point:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    return max(totals, key=lambda d: totals[d]) if totals else None


def load_components(root: str | os.PathLike, index: PipelineIndex) -> dict[str, Any]:
    """Every component of the pipeline at ``root``: models empty, the rest loaded from their folders."""
    root = Path(root)
    out: dict[str, Any] = {}
    for name, entry in index.components.items():
        if entry is None:
            out[name] = None
            continue
        cls = component_class(*entry)
        folder = root / name
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            out[name] = build_empty(cls, folder)
        else:
            out[name] = cls.from_pretrained(folder)
    return out
