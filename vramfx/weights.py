"""Where each captured weight is read from: the module itself, or the weights mapping.

Runs between capture and planning. It checks, before anything is allocated, that every weight the
graph reads has a source whose shape and dtype match the model, so a bad checkpoint fails at
compile time with every problem listed, not halfway through a call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vramfx.capture import WeightSpec
from vramfx.errors import WeightsError
from vramfx.storage.host import HostSource
from vramfx.storage.source import TensorInfo, WeightSource

_LISTED = 10


@dataclass(frozen=True)
class WeightRef:
    """One graph weight bound to the source and key its bytes come from.

    ``requires_grad`` is the model parameter's flag, which the runtime's copies keep.
    """

    name: str
    source: WeightSource
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool = False

    def read_into(self, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy the stored bytes into ``out`` (contiguous uint8 of ``nbytes``)."""
        if bypass_page_cache and _is_disk(self.source):
            self.source.read_into(self.key, out, bypass_page_cache=True)
        else:
            self.source.read_into(self.key, out)


def _is_disk(source: object) -> bool:
    from vramfx.storage.diskmap import DiskMap

    return isinstance(source, DiskMap)


def as_source(weights: Mapping[str, torch.Tensor] | str | os.PathLike | Sequence | None) -> WeightSource | None:
    """Turn what a user may pass as ``weights`` into a WeightSource (a path becomes a DiskMap)."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)) or (
        isinstance(weights, (list, tuple)) and all(isinstance(w, (str, os.PathLike)) for w in weights)
    ):
        from vramfx.storage.diskmap import DiskMap

        return DiskMap(weights)
    if hasattr(weights, "read_into") and hasattr(weights, "info"):
        return weights  # type: ignore[return-value]
    if isinstance(weights, Mapping):
        return _LazyHostSource(weights)
    raise ValueError(
        f"weights must be a DiskMap, a path to safetensors weights, or a Mapping of name to "
        f"tensor; got {type(weights).__name__}"
    )


class _LazyHostSource:
    """A plain ``Mapping[str, Tensor]`` served as a WeightSource, touching only keys asked for."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor itself, so a runtime can pin it in place or copy parts of it."""
        return self._tensors[key]

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self._tensors[key].detach().contiguous().reshape(-1).view(torch.uint8))


def resolve_weights(
    specs: Sequence[WeightSpec],
    weights: WeightSource | None,
    *,
    renamed: Mapping[str, str] | None = None,
) -> dict[str, WeightRef]:
    """Bind every captured weight to its source, checking names, shapes and dtypes.

    A real tensor on the module is used as it is, except a persistent buffer that ``weights``
    also holds (a checkpoint's running statistics beat the module's initial values). A meta
    tensor must come from ``weights``, under its own name or any tied twin's name, or under
    the checkpoint key ``renamed`` maps that name to.

    Raises
    ------
    WeightsError
        Listing every missing weight and every shape or dtype mismatch.
    """
    host = HostSource({s.name: s.value for s in specs if s.value is not None})
    refs: dict[str, WeightRef] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for spec in specs:
        key = _key_in(weights, spec.aliases, renamed or {}) if weights is not None else None
        from_module = spec.value is not None and not (spec.kind == "buffer" and spec.persistent and key)
        if from_module:
            source, key = host, spec.name
        elif key is not None:
            source = weights
        else:
            missing.append(spec.name)
            continue
        info = source.info(key)
        if tuple(info.shape) != tuple(spec.shape) or info.dtype != spec.dtype:
            mismatched.append(
                f"{key}: stored {tuple(info.shape)} {_dtype(info.dtype)}, model expects "
                f"{tuple(spec.shape)} {_dtype(spec.dtype)}"
            )
            continue
        refs[spec.name] = WeightRef(
            spec.name, source, key, spec.shape, spec.dtype, info.nbytes, requires_grad=spec.requires_grad
        )
    if missing or mismatched:
        raise WeightsError(_report(missing, mismatched, weights))
    return refs


def _key_in(weights: WeightSource, names: Sequence[str], renamed: Mapping[str, str]) -> str | None:
    candidates = [*names, *(renamed[n] for n in names if n in renamed)]
    return next((n for n in candidates if n in weights), None)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _report(missing: list[str], mismatched: list[str], weights: object) -> str:
    lines = []
    if missing:
        shown = ", ".join(missing[:_LISTED]) + (f", … ({len(missing)} in all)" if len(missing) > _LISTED else "")
        where = "no weights were given" if weights is None else "not found in the weights"
        lines.append(
            f"{len(missing)} meta parameter(s) have no weight ({where}): {shown}. Pass "
            "weights=DiskMap(path) holding them (check key names; DiskMap's key_map renames keys)."
        )
    if mismatched:
        shown = "; ".join(mismatched[:_LISTED]) + (f"; … ({len(mismatched)} in all)" if len(mismatched) > _LISTED else "")
        lines.append(
            f"{len(mismatched)} weight(s) differ from the model: {shown}. Build the model with the "
            "checkpoint's config and dtype."
        )
    return " ".join(lines)
