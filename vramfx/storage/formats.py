"""Which reader a weights source needs: GGUF, scaled fp8, or plain safetensors.

``compile``, ``vramfx plan`` and ``vramfx inspect`` take a path or a mapping; this module turns it
into a source whose every tensor is served as it must be read — never, for instance, a
scaled-fp8 weight without its scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramfx.storage.diskmap import DiskMap, KeyMap
from vramfx.storage.gguf import GGUFMap
from vramfx.storage.scaled_fp8 import ScaledFP8Map, holds_scales
from vramfx.storage.variants import weight_files
from vramfx.storage.views import ViewSource

__all__ = ["is_gguf", "open_weights", "interpret"]


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a GGUF file (by its suffix)."""
    return Path(path).suffix.lower() == ".gguf"


def open_weights(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    key_map: KeyMap | None = None,
    variant: str | None = None,
) -> Any:
    """The lazy source for weights at a path: a GGUF file, or safetensors (one file, a list of
    them, a folder, an index), read as scaled fp8 when its names show scales.

    ``key_map`` renames stored keys (DiskMap's); ``variant`` reads a folder's files saved in that
    variant (``"fp16"``: ``*.fp16.safetensors``), as ``from_pretrained`` does.

    Examples
    --------
    >>> type(open_weights("flux1-dev-Q8_0.gguf")).__name__  # doctest: +SKIP
    'GGUFMap'
    >>> type(open_weights("flux1-dev-fp8-scaled.safetensors")).__name__  # doctest: +SKIP
    'ScaledFP8Map'
    """
    if isinstance(source, (str, os.PathLike)) and is_gguf(source):
        if key_map is not None or variant is not None:
            raise ValueError("key_map and variant apply to safetensors weights, not to a GGUF file")
        return GGUFMap(source)
    if variant is not None:
        if not (isinstance(source, (str, os.PathLike)) and Path(source).is_dir()):
            raise ValueError(f"variant={variant!r} chooses among a folder's files; {source} is not a folder")
        source = weight_files(Path(source), variant)
    return interpret(DiskMap(source, key_map=key_map))


def interpret(source: Any) -> Any:
    """``source``, wrapped in a :class:`~vramfx.storage.scaled_fp8.ScaledFP8Map` when it holds a
    scaled-fp8 checkpoint; other sources are returned as they are."""
    if isinstance(source, ViewSource) or not hasattr(source, "keys"):
        return source
    if holds_scales(source.keys()):
        return ScaledFP8Map(source)
    return source
