"""Scaled-fp8 checkpoints as ComfyUI writes them: fp8 weights, each with one float32 scale.

Two conventions exist, both handled:

- the original one: ``<layer>.weight`` in ``float8_e4m3fn`` (or ``e5m2``), ``<layer>.scale_weight``
  a float32 scalar, an optional ``<layer>.scale_input``, and a ``scaled_fp8`` marker tensor;
- the current one: ``<layer>.weight``, ``<layer>.weight_scale``, an optional ``<layer>.input_scale``
  and ``<layer>.comfy_quant``, a JSON record (``{"format": "float8_e4m3fn"}``) stored as bytes.

A weight's value is ``weight.to(compute_dtype) * scale``. The fp8 bytes move and stay resident;
the multiply happens in the decode step before the nodes that read the weight. Input scales only
matter to fp8 matrix multiplies, which vramfx does not run, so they are not served. A scale that
is not one number per tensor (per channel, per block) is refused: serving the weight without it
would be silently wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.quant.decoders import ScaledDecoder
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.layouts import apply_renames, community_renames
from vramfx.storage.views import View, ViewSource, stored_view
from vramfx.util import dtype_name

__all__ = ["ScaledFP8Map", "holds_scales"]

#: ``<layer>`` + suffix → the scale of ``<layer>.weight``: the original and the current name.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: Tensors that describe the format rather than hold weights: not served.
FORMAT_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def holds_scales(keys: Iterable[str]) -> bool:
    """Whether tensor names are those of a scaled-fp8 checkpoint.

    Examples
    --------
    >>> holds_scales(["blocks.0.q.weight", "blocks.0.q.scale_weight"]), holds_scales(["w"])
    (True, False)
    """
    return any(k == MARKER or k.endswith(SCALE_SUFFIXES) for k in keys)


class ScaledFP8Map(ViewSource):
    """A scaled-fp8 checkpoint as a lazy ``Mapping[str, Tensor]`` of the weights it stores.

    ``sm[name]`` is the weight's value in float32 (``fp8 * scale``); :meth:`info` and
    :meth:`read_into` give its stored fp8 bytes, and :meth:`decoder` the scale. ``compile`` and
    ``vramfx plan`` open a scaled checkpoint this way whenever its names show one (a path, or a
    DiskMap, holding ``*.scale_weight`` or ``*.weight_scale``), so its scales are never ignored.

    Parameters
    ----------
    source:
        A path (as :class:`~vramfx.storage.diskmap.DiskMap` takes), a DiskMap, or a mapping of
        tensors (a state dict).
    layout:
        ``"auto"`` maps the original Flux and Wan layouts ComfyUI files use to diffusers' names
        (:mod:`vramfx.storage.layouts`); ``None`` keeps the stored names.

    Raises
    ------
    WeightsError
        If a scale is not one number, names no fp8 weight, or ``comfy_quant`` names a format
        other than fp8.

    Examples
    --------
    >>> sd = {"fc.weight": torch.full((2, 2), 3.0).to(torch.float8_e4m3fn),
    ...       "fc.scale_weight": torch.tensor(0.5), "fc.bias": torch.zeros(2)}
    >>> sm = ScaledFP8Map(sd)
    >>> sorted(sm), sm.decoder("fc.weight").format, sm["fc.weight"][0].tolist()
    (['fc.bias', 'fc.weight'], 'float8_e4m3fn*scale', [1.5, 1.5])
    """

    def __init__(self, source: Any, *, layout: str | None = "auto") -> None:
        if layout not in ("auto", None):
            raise ValueError(f"layout must be 'auto' or None, got {layout!r}")
        base = DiskMap(source) if isinstance(source, (str, os.PathLike, list, tuple)) else source
        if not isinstance(base, Mapping) or not hasattr(base, "__getitem__"):
            raise ValueError(f"source must be a path, a DiskMap or a mapping of tensors, got {type(source).__name__}")
        try:
            views = _scaled_views(base)
            if layout == "auto":
                views = apply_renames(views, community_renames({n: v.shape for n, v in views.items()}))
        except BaseException:
            if base is not source:
                base.close()
            raise
        super().__init__(base, views)


def _scaled_views(base: Mapping[str, torch.Tensor]) -> dict[str, View]:
    """Every weight of ``base`` as a view: fp8 weights with a scale decoded, format tensors left out."""
    scales: dict[str, float] = {}
    for key in base:
        layer = next((key[: -len(s)] for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if layer is None:
            continue
        weight = layer + ".weight"
        info = _info(base, weight) if weight in base else None
        if info is None or info.dtype not in FP8_DTYPES:
            stored = "missing" if info is None else dtype_name(info.dtype)
            raise WeightsError(f"{key} scales {weight}, which is {stored}, not an fp8 tensor")
        _check_format(base, layer, info.dtype)
        scales[weight] = _scalar(base, key)
    views = {}
    for key in base:
        if key == MARKER or key.endswith(SCALE_SUFFIXES + FORMAT_SUFFIXES):
            continue
        info = _info(base, key)
        decoder = ScaledDecoder(tuple(info.shape), dtype=info.dtype, scale=scales[key]) if key in scales else None
        views[key] = stored_view(key, info, decoder)
    return views


def _info(base: Any, key: str):
    """The stored tensor's description: from the source's headers, or from the tensor in memory."""
    if hasattr(base, "info"):
        return base.info(key)
    from vramfx.storage.source import TensorInfo

    t = base[key]
    return TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size())


def _scalar(base: Mapping[str, torch.Tensor], key: str) -> float:
    """A per-tensor scale as a float; anything else is refused."""
    scale = base[key]
    if scale.numel() != 1 or not scale.is_floating_point():
        raise WeightsError(
            f"{key} holds {tuple(scale.shape)} {dtype_name(scale.dtype)} values; vramfx decodes one float scale "
            "per tensor (per-channel and block scales are not supported)"
        )
    return float(scale.float().reshape(()).item())


def _check_format(base: Mapping[str, torch.Tensor], layer: str, dtype: torch.dtype) -> None:
    """A ``comfy_quant`` record, when there is one, must name this fp8 format."""
    key = layer + ".comfy_quant"
    if key not in base:
        return
    try:
        record = json.loads(bytes(base[key].to(torch.uint8).tolist()).decode("utf-8"))
        name = record.get("format")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{key} is not a JSON quantization record ({err})") from None
    if name != dtype_name(dtype):
        raise WeightsError(
            f"{key} says the weight is stored as {name!r}; vramfx decodes float8_e4m3fn and float8_e5m2 "
            f"with a per-tensor scale only"
        )
