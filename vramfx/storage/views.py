"""Weight sources whose tensors are views of another source's: renamed, row ranges, decoded.

Community checkpoints rarely store a model's tensors one for one under its state-dict names: a
GGUF file stores GGML blocks, a scaled-fp8 file stores fp8 values beside their scales, and both
often keep the original authors' layout (Flux's fused ``qkv``, llama.cpp's names). A
:class:`ViewSource` serves such a file under the model's names without copying or reading
anything up front: each of its tensors is a :class:`View` — a byte range of one stored tensor,
and the :class:`~vramfx.quant.decoders.Decoder` that turns those bytes into values when they
are not plain values. Reads stay byte ranges of the file, so the runtime streams views exactly
as it streams a DiskMap's tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.quant.decoders import Decoder, RowOrder, ScaledDecoder
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.source import TensorInfo


@dataclass(frozen=True)
class View:
    """One served tensor: bytes ``[start, start + info.nbytes)`` of the stored tensor ``key``.

    ``info`` describes those bytes as they are stored: for a view with a ``decoder``, a flat run
    of the decoder's stored dtype (its values' shape is ``decoder.shape``); otherwise the
    tensor itself.
    """

    key: str
    start: int
    info: TensorInfo
    decoder: Decoder | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The values' shape."""
        return tuple(self.decoder.shape) if self.decoder is not None else tuple(self.info.shape)


def stored_view(key: str, info: TensorInfo, decoder: Decoder | None = None) -> View:
    """A whole stored tensor, decoded by ``decoder`` when it has one."""
    return View(key, 0, _flat(info, decoder) if decoder is not None else info, decoder)


def row_view(view: View, start: int, stop: int) -> View:
    """Rows ``[start, stop)`` of ``view`` (its first dimension), without reading anything.

    Raises
    ------
    WeightsError
        If the rows are out of range, or do not fall on whole blocks of a decoded tensor.
    """
    shape = view.shape
    if not shape or not 0 <= start < stop <= shape[0]:
        raise WeightsError(f"{view.key}: rows {start}:{stop} are outside its shape {shape}")
    if view.decoder is not None:
        first, decoder = view.decoder.rows(start, stop)
        return View(view.key, view.start + first, _flat(view.info, decoder, first), decoder)
    row_bytes = view.info.nbytes // shape[0]
    info = view.info
    offset = None if info.offset is None else info.offset + start * row_bytes
    sliced = replace(info, shape=(stop - start, *shape[1:]), nbytes=(stop - start) * row_bytes, offset=offset)
    return View(view.key, view.start + start * row_bytes, sliced, None)


def reordered_view(view: View, order: RowOrder) -> View:
    """``view`` with its rows put in ``order`` as it is decoded (a plain tensor gains a decoder)."""
    decoder = view.decoder or ScaledDecoder(view.shape, dtype=view.info.dtype)
    decoder = decoder.reordered(order)
    return View(view.key, view.start, _flat(view.info, decoder), decoder)


def _flat(info: TensorInfo, decoder: Decoder, shift: int = 0) -> TensorInfo:
    """``info`` for the flat run of stored elements ``decoder`` reads, ``shift`` bytes further on."""
    count = decoder.nbytes // decoder.stored_dtype.itemsize
    offset = None if info.offset is None else info.offset + shift
    return TensorInfo((count,), decoder.stored_dtype, decoder.nbytes, info.file, offset)


class ViewSource(Mapping[str, torch.Tensor]):
    """A read-only mapping whose tensors are :class:`View` s of another source's.

    ``vs[name]`` reads the view's bytes and returns its values: decoded to float32 for a view
    with a decoder, the stored tensor otherwise. :meth:`info`, :meth:`decoder`,
    :meth:`read_into` and :meth:`read_range_into` are what the runtime uses: the stored bytes
    and how to decode them.

    Parameters
    ----------
    base:
        Where the bytes are stored: a :class:`~vramfx.storage.diskmap.DiskMap` (reads are
        byte ranges of its files) or a mapping of host tensors.
    views:
        Served name to view.

    Examples
    --------
    >>> from vramfx.storage.host import HostSource
    >>> base = HostSource({"qkv": torch.arange(6.0).view(3, 2)})
    >>> src = ViewSource(base, {"k": row_view(stored_view("qkv", base.info("qkv")), 1, 2)})
    >>> src["k"].tolist()
    [[2.0, 3.0]]
    """

    #: Plain floating tensors in another dtype than the model's are held as stored and cast where
    #: they are read, as these formats' own loaders do (a GGUF file's F32 norms in a bf16 model).
    casts_plain_tensors = True

    def __init__(self, base: Any, views: Mapping[str, View]) -> None:
        self._base = base
        self._views = dict(views)

    @property
    def base(self) -> Any:
        """The source the bytes come from."""
        return self._base

    @property
    def from_disk(self) -> bool:
        """Whether the bytes are read from files (so ``bypass_page_cache`` applies)."""
        return isinstance(self._base, DiskMap) or bool(getattr(self._base, "from_disk", False))

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views[name]
        raw = torch.empty(view.info.nbytes, dtype=torch.uint8)
        self.read_into(name, raw)
        stored = raw.view(view.info.dtype)
        if view.decoder is None:
            return stored.view(view.info.shape)
        out = torch.empty(view.decoder.shape, dtype=torch.float32)
        view.decoder.decode_into(stored, out)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, name: object) -> bool:
        return name in self._views

    def __repr__(self) -> str:
        decoded = sum(1 for v in self._views.values() if v.decoder is not None)
        return f"{type(self).__name__}({len(self)} tensors, {decoded} decoded, over {self._base!r})"

    # -- what the runtime reads ---------------------------------------------------------------
    def view(self, name: str) -> View:
        """The view served as ``name``."""
        return self._views[name]

    def info(self, name: str) -> TensorInfo:
        """The stored bytes of ``name``: shape, dtype, length, and file offset where known."""
        return self._views[name].info

    def decoder(self, name: str) -> Decoder | None:
        """How ``name``'s stored bytes become its values; ``None`` when they are its values."""
        return self._views[name].decoder

    @property
    def nbytes(self) -> int:
        """Stored bytes of every served tensor."""
        return sum(v.info.nbytes for v in self._views.values())

    def read_into(self, name: str, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy ``name``'s stored bytes into ``out``, a contiguous CPU uint8 tensor of
        ``info(name).nbytes``. Thread-safe as the base source is."""
        view = self._views[name]
        if out.numel() != view.info.nbytes:
            raise ValueError(f"out must hold the {view.info.nbytes} stored bytes of {name!r}, got {out.numel()}")
        self._read(view, 0, out, bypass_page_cache)

    def read_range_into(self, name: str, start: int, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy bytes ``[start, start + out.numel())`` of ``name``'s stored bytes into ``out``."""
        view = self._views[name]
        if not 0 <= start <= start + out.numel() <= view.info.nbytes:
            raise ValueError(f"bytes {start}:{start + out.numel()} are outside the {view.info.nbytes} bytes of {name!r}")
        self._read(view, start, out, bypass_page_cache)

    def _read(self, view: View, start: int, out: torch.Tensor, bypass_page_cache: bool) -> None:
        base, first = self._base, view.start + start
        if isinstance(base, DiskMap):
            base.read_range_into(view.key, first, out, bypass_page_cache=bypass_page_cache)
            return
        tensor = base[view.key].detach()
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        out.copy_(data[first : first + out.numel()])

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the base source's files, if it has any."""
        close = getattr(self._base, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> ViewSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
