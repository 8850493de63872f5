"""GGUF files, read lazily: each tensor a byte range of the file, decoded where the model uses it.

The header — metadata and tensor table — is parsed with the ``gguf`` package (``pip install
'vramfx[gguf]'``); tensor data is then read with ``pread`` by the same machinery as a
:class:`~vramfx.storage.diskmap.DiskMap` (byte ranges into a caller's buffer, several threads at
once, ``O_DIRECT`` on request, a file changed since it was opened an error). Nothing is loaded
whole.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.quant.decoders import BlockDecoder, Decoder
from vramfx.quant.ggml import BY_TYPE_ID, FORMATS, PLAIN_DTYPES
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.layouts import apply_renames, community_renames
from vramfx.storage.source import TensorInfo
from vramfx.storage.views import View, ViewSource, stored_view

log = logging.getLogger(__name__)

__all__ = ["GGUFMap", "GGUFTensor", "open_gguf_file"]

#: Plain GGML types beyond the float ones :mod:`vramfx.quant.ggml` decodes: stored as is.
_INTEGER_TYPES = {24: torch.int8, 25: torch.int16, 26: torch.int32, 27: torch.int64, 28: torch.float64}
#: Where ComfyUI-GGUF's converter records the shape of a tensor it stored flattened (5-D
#: convolutions, rows not a multiple of 256): ``comfy.gguf.orig_shape.<tensor name>``.
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
_KEPT_METADATA_TYPES = (str, int, float, bool)


class GGUFTensor:
    """One tensor of a GGUF file as its header describes it."""

    __slots__ = ("name", "type_name", "type_id", "shape", "nbytes", "offset")

    def __init__(self, name: str, type_name: str, type_id: int, shape: tuple[int, ...], nbytes: int, offset: int):
        self.name, self.type_name, self.type_id = name, type_name, type_id
        self.shape, self.nbytes, self.offset = shape, nbytes, offset


class _GGUFFile(DiskMap):
    """The tensors of one GGUF file by stored name, as raw bytes (what :class:`GGUFMap` views).

    A quantized tensor is described as its flat run of bytes (``uint8``); a plain one (F32,
    F16, BF16, integers) as itself. :attr:`tensors` keeps each header entry, :attr:`metadata`
    the header's scalar and string values.
    """

    def __init__(self, source: str | os.PathLike[str], device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, key_map: Any = None) -> None:
        self.tensors: dict[str, GGUFTensor] = {}
        self.metadata: dict[str, Any] = {}
        self.orig_shapes: dict[str, tuple[int, ...]] = {}
        super().__init__(source, device, dtype, key_map)

    def _open(self, source: Any, key_map: Any) -> None:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"source must be the path of one .gguf file, got {type(source).__name__}")
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"{path} does not exist or is not a file.")
        f = self._open_file(path)
        tensors, metadata, orig_shapes = _read_header(path)
        # The header was parsed by path: make sure it is the file the descriptor holds.
        st = os.stat(path)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (f.dev, f.ino, f.size, f.mtime_ns):
            raise WeightsError(f"{path} changed while its header was read; open it again.")
        _check_ranges(path, tensors, f.size)
        self.metadata, self.orig_shapes = metadata, orig_shapes
        for t in tensors:
            self.tensors[t.name] = t
            plain = PLAIN_DTYPES.get(t.type_name) or _INTEGER_TYPES.get(t.type_id)
            shape = self.shape_of(t.name)
            if plain is not None:
                info = TensorInfo(shape, plain, t.nbytes, f.path, t.offset)
            else:
                info = TensorInfo((t.nbytes,), torch.uint8, t.nbytes, f.path, t.offset)
            self._entries[t.name] = (f, info)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as torch orders it (GGUF stores dimensions innermost first)."""
        t = self.tensors[name]
        shape = self.orig_shapes.get(name)
        if shape is None:
            return t.shape
        if math.prod(shape) != math.prod(t.shape):
            raise WeightsError(
                f"{self.files[0]}: {ORIG_SHAPE_PREFIX}{name} = {shape} does not hold the tensor's "
                f"{math.prod(t.shape)} values"
            )
        return shape

    def decoder_of(self, name: str) -> Decoder | None:
        """The decoder of a quantized tensor; ``None`` for a plain one.

        Raises
        ------
        WeightsError
            If the tensor's GGML type is one vramfx does not decode.
        """
        t = self.tensors[name]
        if t.type_name in PLAIN_DTYPES or t.type_id in _INTEGER_TYPES:
            return None
        block = BY_TYPE_ID.get(t.type_id)
        if block is None:
            supported = ", ".join(n for n in FORMATS if n not in PLAIN_DTYPES)
            raise WeightsError(
                f"{self.files[0]}: tensor {name!r} is stored as {t.type_name}, which vramfx does not decode "
                f"(it decodes {supported}, F32, F16 and BF16). Requantize the file to one of those."
            )
        return BlockDecoder(self.shape_of(name), block=block)


def open_gguf_file(path: str | os.PathLike[str]) -> _GGUFFile:
    """A GGUF file's tensors by stored name, as raw bytes, with its header (for ``vramfx inspect``).

    Examples
    --------
    >>> with open_gguf_file("flux1-dev-Q4_K_S.gguf") as f:  # doctest: +SKIP
    ...     print(f.tensors["double_blocks.0.img_attn.qkv.weight"].type_name)
    Q4_K
    """
    return _GGUFFile(path)


class GGUFMap(ViewSource):
    """A GGUF file as a lazy, read-only ``Mapping[str, Tensor]`` under the model's names.

    Quantized tensors move and stay resident as their GGML blocks — 2 to 4 times fewer bytes
    than bf16 — and are decoded on the compute device right before the nodes that read them
    (``vramfx.compile(model, budget, weights=GGUFMap(path))``). ``gm[name]`` reads one tensor and
    returns its values in float32 (plain tensors in their stored dtype). :meth:`info` and
    :meth:`read_into` describe and copy the stored bytes; :meth:`decoder` says how they decode.

    Decoded types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; plain: F32, F16,
    BF16 (and integer tensors). Names are mapped to the model's state-dict names where the file
    uses a layout the community ships (``layout="auto"``, see :mod:`vramfx.storage.layouts`):
    llama.cpp's names for Llama (``blk.0.attn_q.weight``, query and key rows put back in
    Hugging Face's order), the original BFL layout for diffusers' ``FluxTransformer2DModel``
    (fused ``qkv`` split into views), the original Wan layout for ``WanTransformer3DModel``.
    Files already in the model's names are served as they are.

    Parameters
    ----------
    path:
        One ``.gguf`` file.
    key_map:
        Renames served names afterwards: a dict, or a callable returning the new name (``None``
        drops the tensor).
    layout:
        ``"auto"`` maps a known community layout to the model's names; ``None`` serves the
        stored names.

    Raises
    ------
    ImportError
        If the ``gguf`` package is not installed.
    WeightsError
        If the file is not a valid GGUF file (bad magic or version, big-endian, a tensor outside
        the file or overlapping another, a misaligned offset), or a layout's tensors do not
        have the shapes it needs.

    Examples
    --------
    >>> with vramfx.GGUFMap("flux1-dev-Q4_K_S.gguf") as weights:  # doctest: +SKIP
    ...     print(weights.decoder("transformer_blocks.0.attn.to_q.weight").format)
    Q4_K
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
        layout: str | None = "auto",
    ) -> None:
        if layout not in ("auto", None):
            raise ValueError(f"layout must be 'auto' or None, got {layout!r}")
        if key_map is not None and not (isinstance(key_map, Mapping) or callable(key_map)):
            raise ValueError(f"key_map={key_map!r} must be a dict or a callable from old to new name.")
        self._args = (path, key_map, layout)
        stored = _GGUFFile(path)
        try:
            views = {name: stored_view(name, stored.info(name), stored.decoder_of(name)) for name in stored.tensors
                     if stored.tensors[name].type_id in BY_TYPE_ID or stored.tensors[name].type_id in _INTEGER_TYPES}
            if layout == "auto":
                shapes = {name: view.shape for name, view in views.items()}
                views = apply_renames(views, community_renames(shapes, stored.metadata))
            views = _renamed(views, key_map)
        except BaseException:
            stored.close()
            raise
        unsupported = sorted({t.type_name for t in stored.tensors.values()
                              if t.type_id not in BY_TYPE_ID and t.type_id not in _INTEGER_TYPES})
        if unsupported:
            log.warning("%s: tensors of type %s are not decoded by vramfx and are left out",
                        path, ", ".join(unsupported))
        super().__init__(stored, views)

    @property
    def metadata(self) -> dict[str, Any]:
        """The header's scalar and string metadata (``general.architecture``, ...)."""
        return self.base.metadata

    @property
    def tensors(self) -> dict[str, GGUFTensor]:
        """The file's tensors by stored name, as its header lists them."""
        return self.base.tensors

    @property
    def files(self) -> list[str]:
        return self.base.files

    def evict_page_cache(self) -> None:
        """Drop the file's cached pages (for cold-disk benchmarks)."""
        self.base.evict_page_cache()

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        path, key_map, layout = state["args"]
        self.__init__(path, key_map=key_map, layout=layout)  # type: ignore[misc]


def _renamed(views: dict[str, View], key_map: Any) -> dict[str, View]:
    if key_map is None:
        return views
    out: dict[str, View] = {}
    for name, view in views.items():
        new = key_map.get(name, name) if isinstance(key_map, Mapping) else key_map(name)
        if new is None:
            continue
        if new in out:
            raise WeightsError(f"key_map renames two tensors to {new!r}; the second is {name!r}.")
        out[new] = view
    return out


def _read_header(path: Path) -> tuple[list[GGUFTensor], dict[str, Any], dict[str, tuple[int, ...]]]:
    """The tensor table, the scalar metadata and the recorded original shapes of a GGUF file."""
    try:
        from gguf import GGUFReader, GGUFValueType
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'vramfx[gguf]'") from exc
    try:
        reader = GGUFReader(path)
        if reader.byte_order != "I":
            raise WeightsError(f"{path} is a big-endian GGUF file; vramfx reads little-endian GGUF only.")
        metadata: dict[str, Any] = {}
        orig_shapes: dict[str, tuple[int, ...]] = {}
        for key, field in reader.fields.items():
            if key.startswith(ORIG_SHAPE_PREFIX):
                if field.types[:1] != [GGUFValueType.ARRAY]:
                    raise WeightsError(f"{path}: {key} is not an array of dimensions")
                orig_shapes[key[len(ORIG_SHAPE_PREFIX):]] = tuple(int(d) for d in field.contents())
            elif field.types and field.types[0] != GGUFValueType.ARRAY:
                value = field.contents()
                if isinstance(value, _KEPT_METADATA_TYPES):
                    metadata[key] = value
        tensors = [
            GGUFTensor(
                t.name, t.tensor_type.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())),
                int(t.n_bytes), int(t.data_offset),
            )
            for t in reader.tensors
        ]
        alignment = int(reader.alignment)
    except WeightsError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as err:
        raise WeightsError(f"{path} is not a valid GGUF file: {err}") from None
    finally:
        reader = None  # drops the memory map of the whole file
    misaligned = [t.name for t in tensors if t.offset % alignment]
    if misaligned:
        raise WeightsError(f"{path}: tensor {misaligned[0]!r} starts off the file's {alignment}-byte alignment")
    return tensors, metadata, orig_shapes


def _check_ranges(path: Path, tensors: Sequence[GGUFTensor], size: int) -> None:
    """Every tensor inside the file, none overlapping another."""
    end, previous = 0, None
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset + t.nbytes > size:
            raise WeightsError(
                f"{path}: tensor {t.name!r} ends at byte {t.offset + t.nbytes}, past the end of the file "
                f"({size} bytes); the file is truncated."
            )
        if t.offset < end:
            raise WeightsError(f"{path}: tensors {previous!r} and {t.name!r} overlap.")
        end, previous = t.offset + t.nbytes, t.name
