"""Weights held the DiffSynth-Studio way, served as vramfx weight sources.

- :class:`DiskMap` is vramfx's DiskMap with DiffSynth-Studio's constructor,
  ``DiskMap(path, device, torch_dtype=None, state_dict_converter=None)``, so its users switch by
  changing an import: the converter renames the stored keys, ``torch_dtype`` rounds what is read.
- :func:`source_of` turns such a DiskMap, or DiffSynth-Studio's own ``DiskMap`` object, into the
  source both front ends read (``compile(weights=...)``, ``enable_vram_management(disk_map=...)``).

A ``state_dict_converter`` is a function from a state dict to the renamed state dict; as
DiffSynth-Studio's DiskMap does, it is called on ``{name: name}`` for every stored name, and what it
returns maps each new name to a stored one. Names it leaves out are not served.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from vramfx.storage.converted import ConvertedSource
from vramfx.storage.diskmap import DiskMap as _DiskMap
from vramfx.storage.files import PathLike
from vramfx.storage.host import HostSource
from vramfx.storage.state_dict import load_state_dict

__all__ = ["DiskMap", "converter_key_map", "source_of"]

Converter = Callable[[dict[str, Any]], Mapping[str, Any]]


def converter_key_map(keys: Iterable[str], converter: Converter) -> dict[str, str]:
    """Stored name → new name, from a ``state_dict_converter`` called on ``{name: name}``.

    Raises
    ------
    ValueError
        If the converter does more than rename (a value that is no stored name), or gives one
        stored tensor two names.

    Examples
    --------
    >>> converter_key_map(["a.w", "b.w"], lambda sd: {k.replace("a.", "x."): v for k, v in sd.items() if "a." in k})
    {'a.w': 'x.w'}
    """
    stored = list(keys)
    renamed = converter({name: name for name in stored})
    known = set(stored)
    key_map: dict[str, str] = {}
    for new, old in renamed.items():
        if not isinstance(old, str) or old not in known:
            raise ValueError(
                f"state_dict_converter returned {type(old).__name__} for {new!r}; a DiskMap can only rename "
                "keys with it. Load the weights with vramfx.load_state_dict, convert them, and pass the dict"
            )
        if old in key_map:
            raise ValueError(
                f"state_dict_converter gives the stored tensor {old!r} two names ({key_map[old]!r}, {new!r}); a "
                "DiskMap serves each stored tensor under one name. Load it with vramfx.load_state_dict and pass the dict"
            )
        key_map[old] = new
    return key_map


class DiskMap(_DiskMap):
    """vramfx's :class:`~vramfx.DiskMap` with DiffSynth-Studio's constructor.

    Parameters
    ----------
    path:
        A ``.safetensors`` file or a list of them (or anything vramfx's DiskMap takes).
    device:
        Where ``dm[key]`` puts tensors.
    torch_dtype:
        Floating-point values are read rounded to it: by ``dm[key]``, and by the runtime when it
        streams them (as the original's wrappers read through ``dm[key]``).
    state_dict_converter:
        Renames the stored keys (see the module docstring); names it leaves out are not served.
    buffer_size:
        Accepted and unused: reads go straight into their destination, nothing is buffered.

    Examples
    --------
    >>> import tempfile, safetensors.torch
    >>> path = tempfile.mktemp(suffix=".safetensors")
    >>> safetensors.torch.save_file({"proj.w": torch.ones(2)}, path)
    >>> def converter(state_dict):
    ...     return {name.replace("proj.", "linear."): value for name, value in state_dict.items()}
    >>> dm = DiskMap(path, "cpu", torch_dtype=torch.float16, state_dict_converter=converter)
    >>> list(dm), dm["linear.w"]
    (['linear.w'], tensor([1., 1.], dtype=torch.float16))
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike],
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype | None = None,
        state_dict_converter: Converter | None = None,
        buffer_size: int | None = None,
    ) -> None:
        key_map = None
        if state_dict_converter is not None:
            with _DiskMap(path) as plain:
                key_map = converter_key_map(plain, state_dict_converter).get  # unmapped names: dropped
        super().__init__(path, device, torch_dtype, key_map)
        self._args = (path, device, torch_dtype, state_dict_converter)  # it pickles as it was made


def source_of(weights: object) -> Any:
    """The weight source for a DiffSynth-style DiskMap (this module's, or DiffSynth-Studio's own
    object); None for anything else. Values are rounded to its ``torch_dtype`` on every read."""
    if isinstance(weights, DiskMap):
        return _rounded(weights, weights.dtype)
    if not _is_foreign_disk_map(weights):
        return None
    paths = [os.fspath(p) for p in weights.path]  # type: ignore[attr-defined]
    rename: Mapping[str, str] | None = weights.rename_dict  # type: ignore[attr-defined]  # new name -> stored
    if all(p.endswith(".safetensors") for p in paths):
        key_map = converter_key_map(_stored_keys(paths), lambda _: rename) if rename is not None else None
        source: Any = _DiskMap(paths, key_map=key_map.get if key_map is not None else None)
    else:  # pickles cannot be streamed: loaded whole, as the original loads them
        tensors = load_state_dict(paths)
        source = HostSource({new: tensors[old] for new, old in rename.items()} if rename is not None else tensors)
    return _rounded(source, weights.torch_dtype)  # type: ignore[attr-defined]


def _is_foreign_disk_map(weights: object) -> bool:
    """DiffSynth-Studio's DiskMap, known by where it comes from and what it holds (never imported)."""
    cls = type(weights)
    return (
        cls.__name__ == "DiskMap"
        and cls.__module__.startswith("diffsynth.")
        and all(hasattr(weights, a) for a in ("path", "rename_dict", "torch_dtype"))
    )


def _stored_keys(paths: list[str]) -> list[str]:
    with _DiskMap(paths) as plain:
        return list(plain)


def _rounded(source: Any, dtype: torch.dtype | None) -> Any:
    """``source`` with floating-point values rounded to ``dtype`` on every read (as is, without one)."""
    if dtype is None:
        return source
    chains = {}
    for key in source:
        stored = source.info(key).dtype
        chains[key] = (dtype,) if stored.is_floating_point else (stored,)
    return ConvertedSource(source, chains, keep=False)
