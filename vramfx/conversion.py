"""``vramfx.convert``: a safetensors checkpoint rewritten in a storage dtype, tensor by tensor.

A model can then be streamed from disk already small. The keep list decides which tensors stay in
their dtype, exactly as ``compile``'s ``keep_in_compute_dtype`` does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vramfx.precision import (
    STORAGE_DTYPES,
    KeepSpec,
    declared_patterns,
    exactly_widens,
    keep_items,
    keeps,
    kept_names,
    owners_from_name,
)
from vramfx.progress import step
from vramfx.storage.converted import read_stored
from vramfx.storage.diskmap import MAPPED_ALIGNMENT, DiskMap
from vramfx.storage.files import PathLike, resolve_safetensors
from vramfx.storage.safetensors_header import SAFETENSORS_DTYPES, read_header
from vramfx.util import dtype_name

log = logging.getLogger(__name__)

__all__ = ["convert"]

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def convert(
    src: PathLike | Sequence[PathLike],
    dst: PathLike,
    *,
    dtype: torch.dtype | None,
    keep_in_compute_dtype: KeepSpec = "auto",
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a safetensors checkpoint whose weights are stored in ``dtype``.

    Tensors are read, converted and written one at a time, so memory stays at about the largest
    tensor whatever the checkpoint's size. Floating-point tensors the keep list names, and those
    already in a dtype that converts exactly into ``dtype`` (an fp8 tensor when ``dtype`` is
    bf16), are written as they are; integer tensors always are. A sharded checkpoint (a folder,
    an index or a list of files) becomes a folder with the same shard names and, if ``src`` had
    one, an index; other files (configs) are not copied.

    Parameters
    ----------
    src:
        A ``.safetensors`` file, a list of them, a ``*.index.json``, or a folder.
    dst:
        The file (for a single-file ``src``) or folder to write; it must not exist.
    dtype:
        The storage dtype: ``torch.float8_e4m3fn``, ``float8_e5m2``, ``bfloat16``, ``float16``;
        or ``None`` to keep every tensor's dtype and only rewrite the layout.

    Every file written has its data 64-byte aligned (the header padded, tensors whose size is a
    multiple of 64 bytes first), so a CPU compile uses those tensors in place from the page cache
    instead of copying them (``docs/in-place.md``); other readers see an ordinary safetensors file.
    keep_in_compute_dtype:
        As for :func:`vramfx.compile`: the tensors left in their dtype.
    model:
        The model the checkpoint is for (built empty is fine). With it, the keep list's rules
        about module classes and the model's own declared layers apply, exactly as ``compile``
        applies them; without it, only rules about names and shapes do.

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    ValueError
        If ``dtype`` is not a storage dtype, ``keep_in_compute_dtype`` is malformed, ``dst``
        exists, or its folder does not.
    WeightsError
        If ``src`` is not readable safetensors.

    Examples
    --------
    >>> import tempfile, pathlib, safetensors.torch, vramfx
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> layer = {"proj.weight": torch.randn(256, 256), "proj.bias": torch.randn(256)}
    >>> safetensors.torch.save_file(layer, folder / "model.safetensors")
    >>> fp8 = vramfx.convert(folder / "model.safetensors", folder / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    >>> with vramfx.DiskMap(fp8) as stored:
    ...     stored.info("proj.weight").dtype, stored.info("proj.bias").dtype  # a bias stays as it is ("auto")
    (torch.float8_e4m3fn, torch.float32)
    """
    if dtype is not None and dtype not in STORAGE_DTYPES:
        names = ", ".join(dtype_name(d) for d in STORAGE_DTYPES)
        raise ValueError(f"dtype must be one of {names}, got {dtype!r}")
    keep = keep_items(keep_in_compute_dtype)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the checkpoint is for, or None; got {type(model).__name__}")
    dst = Path(dst)
    if dst.exists():
        raise ValueError(f"dst {dst} exists; remove it or pass another path")
    if not dst.parent.is_dir():
        raise ValueError(f"dst's folder {dst.parent} does not exist; create it first or pass another path")
    layout = resolve_safetensors(src)
    with DiskMap(src):  # every header and the index checked before anything is written
        pass
    single = layout.index is None and isinstance(src, (str, os.PathLike)) and Path(src).is_file()
    stays = _keep_rule(model, keep)

    if single:
        _convert_file(layout.files[0], dst, dtype, stays)
        return dst
    dst.mkdir()
    try:
        total = 0
        for path in layout.files:
            total += _convert_file(path, dst / path.name, dtype, stays)
        if layout.index is not None:
            index = json.loads(layout.index.read_text(encoding="utf-8"))
            index.setdefault("metadata", {})["total_size"] = total
            (dst / layout.index.name).write_text(json.dumps(index, indent=2), encoding="utf-8")
    except BaseException:
        _remove_tree(dst)
        raise
    return dst


def _keep_rule(model: torch.nn.Module | None, keep: Sequence) -> Callable[[str, int], bool]:
    """Whether a checkpoint tensor, by name and number of dimensions, stays in its dtype."""
    if model is None:
        return lambda name, ndim: keeps(name, ndim, owners_from_name(name), keep)
    kept = kept_names(model, keep)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    declared = declared_patterns(model)

    def stays(name: str, ndim: int) -> bool:
        if name in parameters:
            return name in kept
        if name in buffers:
            return True  # buffers are never stored low
        # A key the model names differently (a checkpoint of a wrapper): judged by its name.
        return keeps(name, ndim, owners_from_name(name), keep, declared)

    return stays


def _convert_file(src: Path, dst: Path, dtype: torch.dtype | None, stays: Callable[[str, int], bool]) -> int:
    """Write ``src`` converted to ``dst`` atomically; return the data bytes written."""
    fd = os.open(src, os.O_RDONLY)
    try:
        infos, metadata = read_header(fd, str(src), os.fstat(fd).st_size)
    finally:
        os.close(fd)
    target = {}
    for name, info in infos.items():
        low = dtype is not None and info.dtype.is_floating_point and not exactly_widens(info.dtype, dtype)
        target[name] = dtype if low and not stays(name, len(info.shape)) else info.dtype
    # Tensors whose size is a multiple of MAPPED_ALIGNMENT first, each group widest dtype first
    # (as safetensors' own writer orders data), and the data area starting at such a multiple:
    # then every one of them starts 64-byte aligned in the file and can be used in place.
    def nbytes_of(name: str) -> int:
        return math.prod(infos[name].shape) * target[name].itemsize

    order = sorted(infos, key=lambda n: (nbytes_of(n) % MAPPED_ALIGNMENT != 0, -target[n].itemsize, n))
    header: dict[str, object] = {}
    offset = 0
    for name in order:
        nbytes = math.prod(infos[name].shape) * target[name].itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[target[name]],
            "shape": list(infos[name].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % MAPPED_ALIGNMENT)  # JSON allows trailing spaces
    partial = dst.with_name(dst.name + ".partial")
    try:
        with DiskMap(src) as source, open(partial, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            with step(f"converting {src.name}", total=len(order)) as advance:
                for name in order:
                    tensor = read_stored(source, name)
                    if tensor.dtype != target[name]:
                        tensor = tensor.to(target[name])
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    del tensor  # before the next read: one tensor in memory at a time
                    advance()
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log.info("converted %s -> %s (%d tensors)", src, dst, len(order))
    return offset


def _remove_tree(folder: Path) -> None:
    """Remove what :func:`convert` wrote into ``folder``, and the folder."""
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
