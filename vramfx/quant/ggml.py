"""GGML block formats — the quantizations GGUF files store — and their dequantization in torch.

A GGML tensor is a run of fixed-size blocks; each block packs ``block_size`` consecutive values
(along a row) into ``type_size`` bytes: one or two fp16 scales, sometimes 6-bit sub-block scales,
and 2- to 8-bit codes. Each kernel here turns ``n`` blocks, a ``(n, type_size)`` uint8 tensor,
into their ``(n, block_size)`` float32 values with vectorised torch ops, so it runs wherever torch
does (the CPU here, the GPU under CUDA), and does the float32 arithmetic of the ``gguf`` package's
reference dequantizer in the same order: the results are equal bit for bit.

Byte layouts are those of ggml's ``block_q*`` structs (``ggml-common.h``); ``QK_K`` is the
super-block of the k-quants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

QK_K = 256

_Kernel = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockFormat:
    """One GGML type: how many values a block holds, in how many bytes, and how to decode it.

    ``type_id`` is the type's number in GGUF files (``GGMLQuantizationType``).
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    kernel: _Kernel

    def nbytes(self, numel: int) -> int:
        """Stored bytes of ``numel`` values (a multiple of ``block_size``)."""
        return numel // self.block_size * self.type_size

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(n, type_size)`` uint8 blocks → their ``(n, block_size)`` float32 values.

        Examples
        --------
        >>> q8 = FORMATS["Q8_0"]
        >>> block = torch.zeros(1, q8.type_size, dtype=torch.uint8)
        >>> block[0, :2] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
        >>> block[0, 2] = 6                       # the first code
        >>> q8.dequantize(block)[0, :2].tolist()
        [3.0, 0.0]
        """
        return self.kernel(blocks)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 stored at byte ``at`` of each block, as float32, shape ``(n, 1)``."""
    return blocks[:, at : at + 2].view(torch.float16).float()


def _fields(packed: torch.Tensor, shifts: tuple[int, ...], mask: int, dim: int) -> torch.Tensor:
    """The bit fields ``(packed >> s) & mask`` for each shift, stacked along a new ``dim``.

    One op per shift with a scalar operand: broadcasting a tensor of shifts is several times
    slower on CPU (measured 1.0 ms against 0.07 per million values).
    """
    return torch.stack([(packed >> s if s else packed) & mask for s in shifts], dim=dim)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``(n, m)`` → codes ``(n, 2m)``: the low nibbles of all ``m`` bytes, then the high ones."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``(n, m)`` → their bits ``(n, 8m)``, least significant first within each byte."""
    return _fields(packed, tuple(range(8)), 1, dim=-1).view(packed.shape[0], -1)


def _plain(dtype: torch.dtype, blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(dtype).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_half(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 2:]).float().sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 4:]).float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q5(blocks: torch.Tensor, high_at: int) -> torch.Tensor:
    """The 5-bit codes of Q5_0/Q5_1: four bytes of fifth bits at ``high_at``, then nibbles."""
    return (_nibbles(blocks[:, high_at + 4 :]) | (_bits(blocks[:, high_at : high_at + 4]) << 4)).float()


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _q5(blocks, 2).sub_(16).mul_(_half(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _q5(blocks, 4).mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    scale = (scales & 0x0F).float().mul_(_half(blocks, 80)).view(n, 16, 1)
    offset = (scales >> 4).float().mul_(_half(blocks, 82)).view(n, 16, 1)
    codes = _fields(blocks[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3, dim=2)
    return codes.view(n, 16, 16).float().mul_(scale).sub_(offset).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = _fields(packed[:, :8], (0, 4), 0x0F, dim=1).view(n, 16)
    high = _fields(packed[:, 8:], (0, 2, 4, 6), 0x03, dim=1).view(n, 16)
    sub_scales = (low | (high << 4)).to(torch.int8).sub_(32).float()
    scale = sub_scales.mul_(_half(blocks, 108)).view(n, 16, 1)
    codes = _fields(blocks[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3, dim=2)
    high_bits = _fields(blocks[:, :32], tuple(range(8)), 1, dim=1)
    # A clear high bit subtracts 4: the codes are 3-bit signed, stored with an inverted top bit.
    signed = codes.view(n, 16, 16).to(torch.int8) - ((high_bits.view(n, 16, 16) ^ 1) << 2).to(torch.int8)
    return signed.float().mul_(scale).view(n, QK_K)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and eight 6-bit minimums packed in 12 bytes (Q4_K, Q5_K)."""
    n = packed.shape[0]
    rows = packed.reshape(n, 3, 4)
    d, m, md = rows[:, 0], rows[:, 1], rows[:, 2]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    minimums = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scales, minimums


def _k_affine(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``scale * code - minimum`` per 32-value sub-block of Q4_K/Q5_K; ``codes`` is ``(n, 8, 32)``."""
    n = blocks.shape[0]
    scales, minimums = _k_scales(blocks[:, 4:16])
    scale = scales.float().mul_(_half(blocks, 0)).view(n, 8, 1)
    offset = minimums.float().mul_(_half(blocks, 2)).view(n, 8, 1)
    return codes.float().mul_(scale).sub_(offset).view(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    codes = _fields(blocks[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F, dim=2)
    return _k_affine(blocks, codes.view(n, 8, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    low = _fields(blocks[:, 48:].reshape(n, 4, 32), (0, 4), 0x0F, dim=2)
    high = _fields(blocks[:, 16:48], tuple(range(8)), 1, dim=1)
    return _k_affine(blocks, low.view(n, 8, 32) | (high.view(n, 8, 32) << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale = blocks[:, 192:208].contiguous().view(torch.int8).float().mul_(_half(blocks, 208)).view(n, 16, 1)
    low = _fields(blocks[:, :128].reshape(n, 2, 64), (0, 4), 0x0F, dim=2)
    high = _fields(blocks[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03, dim=2)
    codes = (low.view(n, 8, 32) | (high.view(n, 8, 32) << 4)).to(torch.int8).sub_(32)
    return codes.view(n, 16, 16).float().mul_(scale).view(n, QK_K)


#: Every GGML type vramfx decodes, by the name GGUF tools print.
FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("F32", 0, 1, 4, partial(_plain, torch.float32)),
        BlockFormat("F16", 1, 1, 2, partial(_plain, torch.float16)),
        BlockFormat("Q4_0", 2, 32, 18, _q4_0),
        BlockFormat("Q4_1", 3, 32, 20, _q4_1),
        BlockFormat("Q5_0", 6, 32, 22, _q5_0),
        BlockFormat("Q5_1", 7, 32, 24, _q5_1),
        BlockFormat("Q8_0", 8, 32, 34, _q8_0),
        BlockFormat("Q2_K", 10, QK_K, 84, _q2_k),
        BlockFormat("Q3_K", 11, QK_K, 110, _q3_k),
        BlockFormat("Q4_K", 12, QK_K, 144, _q4_k),
        BlockFormat("Q5_K", 13, QK_K, 176, _q5_k),
        BlockFormat("Q6_K", 14, QK_K, 210, _q6_k),
        BlockFormat("BF16", 30, 1, 2, partial(_plain, torch.bfloat16)),
    )
}
#: The same, by the type's number in GGUF files.
BY_TYPE_ID: dict[int, BlockFormat] = {f.type_id: f for f in FORMATS.values()}
#: Types whose values are one plain torch dtype each (no blocks, no scales).
PLAIN_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
