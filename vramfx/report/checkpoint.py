"""``vramfx inspect``: what a safetensors or GGUF checkpoint holds, from its headers alone."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vramfx.report.layers import weight_layers
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.files import Layout, resolve_safetensors
from vramfx.storage.formats import is_gguf
from vramfx.storage.gguf import open_gguf_file
from vramfx.storage.scaled_fp8 import SCALE_SUFFIXES, holds_scales
from vramfx.util import dtype_name, format_bytes


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: str


@dataclass(frozen=True)
class CheckpointSummary:
    """The tensors of a safetensors file, folder or index, grouped for people.

    ``shards``, ``dtypes`` and ``layers`` map a shard file name, a stored type or a layer
    (``blocks.3``, ``patch_embedding``) to ``(tensor count, bytes)``; ``largest`` holds the
    largest tensors, largest first. A stored type is a dtype, a GGML type for a GGUF file
    (``Q4_K``), or ``float8_e4m3fn*scale`` for a scaled-fp8 weight. ``format`` is
    ``safetensors``, ``scaled-fp8 safetensors`` or ``gguf``, and ``architecture`` a GGUF file's
    ``general.architecture``.
    """

    path: str
    index: str | None
    count: int
    nbytes: int
    shards: dict[str, tuple[int, int]]
    dtypes: dict[str, tuple[int, int]]
    layers: dict[str, tuple[int, int]]
    largest: tuple[StoredTensor, ...]
    format: str = "safetensors"
    architecture: str | None = None

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {
            "path": self.path,
            "format": self.format,
            "architecture": self.architecture,
            "index": self.index,
            "count": self.count,
            "nbytes": self.nbytes,
            "shards": {k: {"count": c, "nbytes": b} for k, (c, b) in self.shards.items()},
            "dtypes": {k: {"count": c, "nbytes": b} for k, (c, b) in self.dtypes.items()},
            "layers": {k: {"count": c, "nbytes": b} for k, (c, b) in self.layers.items()},
            "largest": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes, "file": t.file}
                for t in self.largest
            ],
        }


def summarize_checkpoint(path: str | os.PathLike[str], *, largest: int = 10) -> CheckpointSummary:
    """Read the headers of the weights at ``path`` and summarise them.

    No tensor data is read: shapes, stored types and byte ranges come from each file's header.

    Parameters
    ----------
    path:
        A ``.safetensors`` file, a folder of them, a sharded checkpoint's ``*.index.json``, or
        a ``.gguf`` file (its tensors by stored name, each with its GGML type).
    largest:
        How many of the largest tensors to list.

    Returns
    -------
    CheckpointSummary

    Raises
    ------
    WeightsError
        If the path does not exist, holds no safetensors, or a header is invalid (a GGUF file
        also needs ``pip install 'vramfx[gguf]'``).

    Examples
    --------
    >>> summarize_checkpoint("flux/transformer/").nbytes  # doctest: +SKIP
    23802932552
    """
    architecture = None
    if is_gguf(path):
        with open_gguf_file(path) as weights:
            layout = Layout(files=(Path(path),))
            architecture = weights.metadata.get("general.architecture")
            tensors = [
                StoredTensor(name, weights.shape_of(name), t.type_name, t.nbytes, Path(path).name)
                for name, t in weights.tensors.items()
            ]
        kind = "gguf"
    else:
        layout = resolve_safetensors(path)
        with DiskMap(path) as weights:
            scaled = {k.removesuffix(s) + ".weight" for k in weights for s in SCALE_SUFFIXES if k.endswith(s)}
            tensors = [
                StoredTensor(key, tuple(info.shape), dtype_name(info.dtype) + ("*scale" if key in scaled else ""),
                             info.nbytes, Path(info.file).name if info.file else "")
                for key in weights
                for info in (weights.info(key),)
            ]
            kind = "scaled-fp8 safetensors" if holds_scales(weights) else "safetensors"
    layer = weight_layers([t.name for t in tensors])
    return CheckpointSummary(
        path=str(path),
        format=kind,
        architecture=architecture,
        index=str(layout.index) if layout.index else None,
        count=len(tensors),
        nbytes=sum(t.nbytes for t in tensors),
        shards=_tally(tensors, lambda t: t.file, order=[f.name for f in layout.files]),
        dtypes=_tally(tensors, lambda t: t.dtype),
        layers=_tally(tensors, lambda t: layer[t.name]),
        largest=tuple(sorted(tensors, key=lambda t: (-t.nbytes, t.name))[:largest]),
    )


def format_checkpoint(summary: CheckpointSummary, *, max_layers: int = 12) -> str:
    """The summary for a terminal: totals, shards, stored types, layers by size, largest tensors.

    Returns
    -------
    str
        No trailing newline.
    """
    b = format_bytes
    lines = [
        f"{summary.path}: {summary.count} tensors, {b(summary.nbytes)} ({summary.nbytes} bytes)"
        + (f", index {Path(summary.index).name}" if summary.index else "")
        + (f", {summary.format}" if summary.format != "safetensors" else "")
        + (f" ({summary.architecture})" if summary.architecture else ""),
        f"shards ({len(summary.shards)}):",
        *_tally_lines(summary.shards),
        "dtypes:" if summary.format == "safetensors" else "stored types:",
        *_tally_lines(summary.dtypes),
    ]
    by_size = dict(sorted(summary.layers.items(), key=lambda kv: -kv[1][1]))
    shown = dict(list(by_size.items())[:max_layers])
    lines.append(f"layers ({len(summary.layers)}), largest first:")
    lines += _tally_lines(shown)
    if len(by_size) > len(shown):
        rest = list(by_size.values())[len(shown):]
        lines.append(f"  … {len(rest)} more layers, {b(sum(n for _, n in rest))}")
    if summary.largest:
        lines.append("largest tensors:")
        width = max(len(t.name) for t in summary.largest)
        for t in summary.largest:
            shape = "×".join(str(d) for d in t.shape) or "scalar"
            kind = max(9, *(len(u.dtype) for u in summary.largest))
            lines.append(f"  {t.name:<{width}}  {b(t.nbytes):>10}  {t.dtype:<{kind}} {shape}")
    return "\n".join(lines)


def _tally(tensors: Sequence[StoredTensor], key, order: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
    """``key(tensor)`` → (count, bytes), in ``order`` first, then in order of appearance."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for t in tensors:
        counts[key(t)] += 1
        sizes[key(t)] += t.nbytes
    keys = [k for k in order if k in counts] + [k for k in counts if k not in order]
    return {k: (counts[k], sizes[k]) for k in keys}


def _tally_lines(tally: dict[str, tuple[int, int]]) -> list[str]:
    """Indented ``name  count tensors  bytes`` lines."""
    if not tally:
        return []
    width = max(len(k) for k in tally)
    return [
        f"  {k:<{width}}  {c:>6} tensor{'s' if c != 1 else ' '}  {format_bytes(n):>10}" for k, (c, n) in tally.items()
    ]
