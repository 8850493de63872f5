"""Which files a weights source names: one file, a list, a folder, or a sharded checkpoint's index."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vramfx.errors import WeightsError

__all__ = ["PICKLE_SUFFIXES", "Layout", "is_pickle_index", "open_regular", "read_index", "resolve_safetensors"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Layout:
    """The safetensors files of a source and, for a sharded checkpoint, its index.

    ``weight_map`` maps each tensor name to the shard that must hold it (``None`` without an
    index).
    """

    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, Path] | None = None


def resolve_safetensors(source: PathLike | Sequence[PathLike]) -> Layout:
    """Find the safetensors files ``source`` names.

    Parameters
    ----------
    source:
        A ``.safetensors`` file; a list of them; a ``*.index.json``; or a folder, which means
        its index if it has one, else all its ``*.safetensors`` files in name order.

    Returns
    -------
    Layout
        The files, in order, and the index if there is one.

    Raises
    ------
    WeightsError
        If a path does not exist, a folder holds no safetensors or several indexes, a file is a
        pickle checkpoint, or an index names a shard that does not exist.
    ValueError
        If ``source`` is not a path or a non-empty list of paths.

    Examples
    --------
    >>> import tempfile, safetensors.torch, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> safetensors.torch.save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    >>> [f.name for f in resolve_safetensors(d).files]
    ['model.safetensors']
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise WeightsError(f"{path} does not exist.")
        if path.is_dir():
            return _resolve_folder(path)
        if path.name.endswith(".index.json") or re.search(r"\.safetensors\.index\.[^.]+\.json$", path.name):
            return _resolve_index(path)  # a variant's index too: model.safetensors.index.fp16.json
        return Layout(files=(_check_safetensors_file(path),))
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if not source:
            raise ValueError("source is an empty list; pass at least one .safetensors file.")
        files: list[Path] = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise ValueError(f"source contains {item!r}; expected paths to .safetensors files.")
            path = Path(item)
            if not path.is_file():
                raise WeightsError(f"{path} (in source) does not exist or is not a file.")
            if path.resolve() in {f.resolve() for f in files}:
                raise ValueError(f"source lists {path} twice.")
            files.append(_check_safetensors_file(path))
        return Layout(files=tuple(files))
    raise ValueError(
        f"source={source!r} has type {type(source).__name__}; expected a .safetensors file, a list "
        f"of them, a *.index.json, or a folder."
    )


def open_regular(path: PathLike, flags: int = os.O_RDONLY) -> int:
    """A file descriptor for ``path`` if it is a regular file (or a link to one).

    Never blocks: a FIFO or a device named like a weights file is refused, not read.

    Raises
    ------
    WeightsError
        Naming ``path`` and what it is: missing, a directory, a FIFO, a device, unreadable.

    Examples
    --------
    >>> open_regular("/")
    Traceback (most recent call last):
        ...
    vramfx.errors.WeightsError: / is a directory, not a regular file; weights are read from regular files only.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise WeightsError(f"{path} does not exist.") from None
    except OSError as err:
        raise WeightsError(f"{path} cannot be opened for reading: {err.strerror or err}.") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise WeightsError(f"{path} is a {_kind(mode)}, not a regular file; weights are read from regular files only.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def read_index(index: Path) -> dict[str, Path]:
    """The ``weight_map`` of a sharded checkpoint's index, with shard paths next to the index.

    Shard names are relative to the index's folder: one that leaves it (``..``, an absolute
    path) is refused. A shard that is a symbolic link (as in the hub's cache) is followed.

    Raises
    ------
    WeightsError
        If the index is not a regular file holding JSON with a ``weight_map`` of names to file
        names, or names a shard outside its folder, missing, or not a regular file.
    """
    fd = open_regular(index)
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else repr(err)
        raise WeightsError(f"{index}: not a checkpoint index with a weight_map ({reason}).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map must map tensor names to shard file names.")
    shards = {}
    for name in sorted(set(weight_map.values())):
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise WeightsError(
                f"{index} names shard {name!r}, which is not a file in the index's folder; an index may "
                f"only name shards next to it (a folder below is fine, '..' and absolute paths are not)."
            )
        shard = index.parent / relative
        if not shard.exists():
            raise WeightsError(f"{index} names shard {name!r}, which does not exist ({shard}).")
        if not shard.is_file():
            raise WeightsError(f"{index} names shard {name!r}, which is not a regular file ({shard}).")
        shards[name] = shard
    return {key: shards[name] for key, name in weight_map.items()}


def _resolve_index(index: Path) -> Layout:
    """The shards of a safetensors index, in name order."""
    weight_map = read_index(index)
    files = tuple(sorted(set(weight_map.values())))
    for f in files:
        _check_safetensors_file(f)
    return Layout(files=files, index=index, weight_map=weight_map)


def _resolve_folder(folder: Path) -> Layout:
    """A folder's safetensors index if it has one, else all its ``*.safetensors`` files."""
    indexes = [p for p in sorted(folder.glob("*.index.json")) if not is_pickle_index(p)]
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise WeightsError(f"{folder} holds several indexes ({names}); pass the one to use.")
    if indexes:
        return _resolve_index(indexes[0])
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors files and no *.index.json.")
    return Layout(files=files)


def is_pickle_index(path: Path) -> bool:
    """A sharded pickle checkpoint's index, e.g. ``pytorch_model.bin.index.json``."""
    return any(path.name.endswith(s + ".index.json") for s in PICKLE_SUFFIXES)


def _check_safetensors_file(path: Path) -> Path:
    """``path``, unless it is a pickle checkpoint, which cannot be streamed."""
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path} is a pickle checkpoint; DiskMap streams safetensors only. Load it whole with "
            f"vramfx.load_state_dict, or convert it once to safetensors to stream it."
        )
    return path
