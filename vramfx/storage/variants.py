"""Which safetensors files of a model folder hold its weights, and in which variant.

diffusers and transformers save a ``variant`` (``"fp16"``, ``"bf16"``) beside the default files
under names with the variant before the suffix: ``diffusion_pytorch_model.fp16.safetensors``,
``model.fp16-00001-of-00002.safetensors`` and ``model.safetensors.index.fp16.json``. A folder may
hold both, so reading "every safetensors file" would read each tensor twice. As their loaders do,
the default files are chosen when no variant is asked for, and only the variant's when one is.
"""

from __future__ import annotations

import re
from pathlib import Path

from vramfx.errors import WeightsError

__all__ = ["variant_of", "weight_files"]

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_INDEX = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")


def variant_of(path: Path) -> str | None:
    """The variant a weights file's name carries, or None.

    Examples
    --------
    >>> [variant_of(Path(n)) for n in ["model.safetensors", "model.fp16.safetensors",
    ...  "model.fp16-00001-of-00002.safetensors", "model-00001-of-00002.safetensors",
    ...  "diffusion_pytorch_model.safetensors.index.bf16.json"]]
    [None, 'fp16', 'fp16', None, 'bf16']
    """
    index = _INDEX.match(path.name)
    if index:
        return index.group("variant")
    stem = _SHARD.sub("", path.name.removesuffix(".safetensors"))
    parts = stem.split(".")
    return parts[-1] if len(parts) > 1 else None


def weight_files(folder: Path, variant: str | None = None) -> Path | list[Path]:
    """The index or the files holding ``folder``'s weights in ``variant`` (None: the default ones).

    Returns
    -------
    Path or list[Path]
        A sharded checkpoint's ``*.index.json``, or its safetensors files in name order.

    Raises
    ------
    WeightsError
        The folder holds no weights in that variant; the message names the variants it holds.
    """
    indexes = [p for p in sorted(folder.glob("*.safetensors.index*.json")) if variant_of(p) == variant]
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise WeightsError(f"{folder} holds several indexes ({names}); pass weights= the one to read.")
    files = [p for p in sorted(folder.glob("*.safetensors")) if variant_of(p) == variant]
    if files:
        return files
    held = sorted({str(variant_of(p)) for p in folder.glob("*.safetensors*") if variant_of(p) is not None})
    if variant is None and held:
        raise WeightsError(
            f"{folder} holds weights only in the variant(s) {', '.join(held)}; pass variant={held[0]!r}."
        )
    held_default = any(variant_of(p) is None for p in folder.glob("*.safetensors"))
    kinds = [*(f"variant {v!r}" for v in held), *(["the default weights (variant=None)"] if held_default else [])]
    holds = f" It holds {', '.join(kinds)}." if kinds else ""
    wanted = f"weights in variant {variant!r}" if variant is not None else "safetensors weights"
    raise WeightsError(f"{folder} holds no {wanted}.{holds}")
