"""Decoders: how one stored weight's bytes become its values in the dtype a model computes in.

A weight whose stored bytes are not simply its values in one dtype — GGML blocks from a GGUF file,
fp8 values with a per-tensor scale, rows in another order than the model's — carries a
:class:`Decoder`. The bytes move and stay resident as they are stored (a flat 1-D tensor of
``stored_dtype``); right before the nodes that read the weight, :meth:`Decoder.decode_into` writes
its values into a buffer of the compute dtype. Any engine can call it: it runs torch ops on
whatever device the two tensors are on, in pieces of at most :data:`CHUNK_ELEMENTS` values, so the
transient memory it takes is bounded (:meth:`Decoder.workspace_bytes`) whatever the weight's size.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from vramfx.errors import WeightsError
from vramfx.quant.ggml import BlockFormat
from vramfx.util import dtype_name

#: Values decoded per piece, by device type: large enough that per-op dispatch stops mattering
#: (measured on a 2-core CPU: 2^14 values per piece decode 8x slower than 2^20), small enough that
#: the temporaries stay a few MiB.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 22}
#: Transient bytes per value a piece takes at most: the float32 result and the unpacked codes
#: (measured peak 8.5 B/value for Q3_K, the worst; 4 to 8 for the others).
WORK_BYTES_PER_ELEMENT = 12
#: Memory passes a decode makes over its values, for the cost model: unpacking, float
#: conversion, the scale arithmetic and the store, each reading and writing about 4 bytes a value.
DECODE_BYTES_PER_ELEMENT = 32


@dataclass(frozen=True)
class RowOrder:
    """Rows stored in another order than the model reads them, put back while decoding.

    ``kind`` is ``"rope_halves"`` — llama.cpp stores each attention head's query and key rows
    interleaved for its rotary kernel, where Hugging Face models keep the two halves apart
    (``heads`` heads) — or ``"swap_halves"`` — the two halves of the rows swapped (Flux's final
    modulation: shift, scale in BFL's layout; scale, shift in diffusers').
    """

    kind: str
    heads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("rope_halves", "swap_halves") or self.heads < 1:
            raise ValueError(f"RowOrder: unknown order {self.kind!r} with heads={self.heads}")

    def destinations(self, rows: int) -> torch.Tensor:
        """``d[i]``: the model row that stored row ``i`` holds (int64, CPU).

        Examples
        --------
        >>> RowOrder("swap_halves").destinations(4).tolist()
        [2, 3, 0, 1]
        >>> RowOrder("rope_halves", heads=1).destinations(4).tolist()
        [0, 2, 1, 3]
        """
        if self.kind == "swap_halves":
            if rows % 2:
                raise WeightsError(f"cannot swap the halves of {rows} rows (an odd count)")
            return torch.arange(rows).roll(rows // 2)
        if rows % (2 * self.heads):
            raise WeightsError(f"{rows} rows do not split into {self.heads} heads of two halves")
        # Stored row (h, j, s) of (heads, half, 2) is model row (h, s, j) of (heads, 2, half).
        return torch.arange(rows).view(self.heads, 2, -1).transpose(1, 2).reshape(-1)


@dataclass(frozen=True, eq=False)
class Decoder(ABC):
    """Turns one weight's stored bytes into its values.

    Attributes
    ----------
    shape:
        The weight's shape, as the model reads it.
    row_order:
        Where stored rows go, when the model's rows are in another order.
    """

    shape: tuple[int, ...]
    row_order: RowOrder | None = None
    _rows_on: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    # -- what the planner and the runtime read -----------------------------------------------
    @property
    @abstractmethod
    def format(self) -> str:
        """What plans and ``vramfx inspect`` call the stored format: ``Q4_K``, ``float8_e4m3fn*scale``."""

    @property
    @abstractmethod
    def stored_dtype(self) -> torch.dtype:
        """The element dtype of the stored bytes, as they move (``uint8`` for GGML blocks)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Stored bytes of the whole weight."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def workspace_bytes(self, device: torch.device | str) -> int:
        """Transient memory :meth:`decode_into` takes on ``device`` beyond its output."""
        return min(self.numel, self._chunk(torch.device(device))) * WORK_BYTES_PER_ELEMENT

    def traffic_bytes(self) -> int:
        """Memory traffic of one decode, for the cost model."""
        return self.nbytes + self.numel * DECODE_BYTES_PER_ELEMENT

    # -- decoding ----------------------------------------------------------------------------
    def decode_into(self, stored: torch.Tensor, out: torch.Tensor) -> None:
        """Write the weight's values into ``out``, rounded once to ``out``'s dtype.

        Parameters
        ----------
        stored:
            The stored bytes: a flat, contiguous tensor of ``stored_dtype`` holding ``nbytes``.
        out:
            A contiguous floating-point tensor of ``shape`` on the same device.
        """
        self._check(stored)
        rows = out.shape[0] if out.dim() else 1
        row_numel = self.numel // max(rows, 1)
        flat = out.view(-1)
        if self.row_order is None:
            step = max(self._unit(), self._chunk(out.device) // self._unit() * self._unit())
            for start in range(0, self.numel, step):
                stop = min(start + step, self.numel)
                flat[start:stop].copy_(self._decode(stored, start, stop))
            return
        destinations = self._destinations(rows, out.device)
        per_chunk = max(1, self._chunk(out.device) // max(row_numel, 1))
        matrix = out.view(rows, row_numel)
        for first in range(0, rows, per_chunk):
            last = min(first + per_chunk, rows)
            values = self._decode(stored, first * row_numel, last * row_numel).view(last - first, row_numel)
            matrix.index_copy_(0, destinations[first:last], values.to(out.dtype))

    def _check(self, stored: torch.Tensor) -> None:
        """Raise unless ``stored`` is this weight's run of stored elements."""
        if stored.dtype != self.stored_dtype or stored.numel() * stored.element_size() != self.nbytes:
            raise WeightsError(
                f"cannot decode {self.format}: got {tuple(stored.shape)} {dtype_name(stored.dtype)}, expected "
                f"{self.nbytes} bytes of {dtype_name(self.stored_dtype)}"
            )

    @abstractmethod
    def _decode(self, stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Values ``[start, stop)`` of the weight in stored order, float32 or the stored dtype, 1-D."""

    def _unit(self) -> int:
        """The fewest values a piece may hold (a block)."""
        return 1

    def _chunk(self, device: torch.device) -> int:
        return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])

    def _destinations(self, rows: int, device: torch.device) -> torch.Tensor:
        """The row order's destinations on ``device``, made once per device."""
        assert self.row_order is not None
        key = str(device)
        with self._lock:
            if key not in self._rows_on:
                self._rows_on[key] = self.row_order.destinations(rows).to(device)
            return self._rows_on[key]

    # -- derived decoders ---------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> tuple[int, "Decoder"]:
        """Rows ``[start, stop)`` of the weight: their first stored byte and their decoder.

        A fused projection (Flux's ``qkv``) is split this way without reading anything: its
        rows are consecutive runs of stored bytes, as long as a split falls on a block boundary.

        Raises
        ------
        WeightsError
            If the split is not on a block boundary, or the rows are stored in another order.
        """
        row_numel = self.numel // self.shape[0]
        first, last = start * row_numel, stop * row_numel
        if self.row_order is not None or first % self._unit() or last % self._unit():
            raise WeightsError(
                f"cannot take rows {start}:{stop} of a {self.format} weight of shape {self.shape}: they do not "
                f"start and end on a {self._unit()}-value block"
            )
        return self._byte(first), replace(self, shape=(stop - start, *self.shape[1:]))

    def reordered(self, order: RowOrder) -> "Decoder":
        """The same weight with its rows put in ``order`` while decoding.

        Raises
        ------
        WeightsError
            If the rows are already reordered, a row is not whole blocks, or the order does not
            fit the number of rows.
        """
        if self.row_order is not None:
            raise WeightsError(f"a {self.format} weight's rows are already reordered ({self.row_order.kind})")
        rows = self.shape[0] if self.shape else 1
        if (self.numel // rows) % self._unit():
            raise WeightsError(
                f"cannot reorder the rows of a {self.format} weight of shape {self.shape}: a row is not a whole "
                f"number of {self._unit()}-value blocks"
            )
        order.destinations(rows)  # raises now, at load, if the order does not fit
        return replace(self, row_order=order)

    @abstractmethod
    def _byte(self, element: int) -> int:
        """The stored byte where value ``element`` starts (on a block boundary)."""


@dataclass(frozen=True, eq=False)
class BlockDecoder(Decoder):
    """A GGML tensor: blocks of a :class:`~vramfx.quant.ggml.BlockFormat`, decoded block by block.

    Examples
    --------
    >>> from vramfx.quant.ggml import FORMATS
    >>> dec = BlockDecoder((2, 32), block=FORMATS["Q8_0"])
    >>> stored = torch.zeros(dec.nbytes, dtype=torch.uint8)
    >>> out = torch.empty(2, 32, dtype=torch.bfloat16)
    >>> dec.decode_into(stored, out)
    >>> dec.format, dec.nbytes, out.abs().sum().item()
    ('Q8_0', 68, 0.0)
    """

    block: BlockFormat = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.block is None:
            raise ValueError("BlockDecoder needs block=")
        if self.numel % self.block.block_size:
            raise WeightsError(
                f"a {self.block.name} weight of shape {self.shape} is not a whole number of "
                f"{self.block.block_size}-value blocks"
            )

    @property
    def format(self) -> str:
        return self.block.name

    @property
    def stored_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        return self.block.nbytes(self.numel)

    def _unit(self) -> int:
        return self.block.block_size

    def _byte(self, element: int) -> int:
        return self.block.nbytes(element)

    def _decode(self, stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        blocks = stored[self._byte(start) : self._byte(stop)].view(-1, self.block.type_size)
        return self.block.dequantize(blocks).view(-1)


@dataclass(frozen=True, eq=False)
class ScaledDecoder(Decoder):
    """Values stored one per element in ``dtype`` and multiplied by a per-tensor ``scale``.

    The scaled-fp8 checkpoints ComfyUI writes hold each linear weight in ``float8_e4m3fn`` with
    one float32 scale; the value is ``w.to(compute_dtype) * scale``, the scale multiplying in
    float32 and the product rounded once. With ``scale=None`` the values are only cast (a plain
    tensor whose rows are reordered).

    Examples
    --------
    >>> dec = ScaledDecoder((2, 2), dtype=torch.float8_e4m3fn, scale=0.5)
    >>> out = torch.empty(2, 2, dtype=torch.bfloat16)
    >>> dec.decode_into(torch.full((4,), 3.0).to(torch.float8_e4m3fn), out)
    >>> dec.format, out.tolist()
    ('float8_e4m3fn*scale', [[1.5, 1.5], [1.5, 1.5]])
    """

    dtype: torch.dtype = None  # type: ignore[assignment]
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.dtype is None:
            raise ValueError("ScaledDecoder needs dtype=")

    @property
    def format(self) -> str:
        return dtype_name(self.dtype) + ("*scale" if self.scale is not None else "")

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def traffic_bytes(self) -> int:
        return self.nbytes + self.numel * 8  # one cast, one multiply

    def decode_into(self, stored: torch.Tensor, out: torch.Tensor) -> None:
        if self.row_order is not None:
            super().decode_into(stored, out)
            return
        self._check(stored)
        # In place, in out's dtype: no float32 copy of the weight.
        out.view(-1).copy_(stored)
        if self.scale is not None:
            # A CPU float32 scalar: the product is computed in float32 and rounded once.
            out.mul_(torch.tensor(self.scale, dtype=torch.float32))

    def workspace_bytes(self, device: torch.device | str) -> int:
        if self.row_order is None:
            return 0
        return min(self.numel, self._chunk(torch.device(device))) * 2 * torch.float32.itemsize

    def _byte(self, element: int) -> int:
        return element * self.dtype.itemsize

    def _decode(self, stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        values = stored[start:stop].float()
        if self.scale is not None:
            values.mul_(torch.tensor(self.scale, dtype=torch.float32))
        return values
