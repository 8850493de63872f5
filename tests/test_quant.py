"""GGML kernels and decoders against the gguf package's reference dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_files import QUANTIZED, dequantize, gguf, random_blocks
from vramfx.errors import WeightsError
from vramfx.quant import decoders
from vramfx.quant.decoders import BlockDecoder, RowOrder, ScaledDecoder
from vramfx.quant.ggml import FORMATS

PLAIN = {"F32": np.float32, "F16": np.float16}


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_kernel_equals_reference_bit_for_bit(qtype):
    """Same float32 arithmetic in the same order as the gguf package: equal bits, every type."""
    blocks = random_blocks(qtype, 512, np.random.default_rng(0))
    expected = dequantize(blocks.reshape(-1), qtype)
    got = FORMATS[qtype].dequantize(torch.from_numpy(blocks)).reshape(-1)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_plain_types_equal_reference(qtype):
    values = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
    stored = values.astype(PLAIN[qtype]) if qtype in PLAIN else gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
    expected = dequantize(stored, qtype)
    got = FORMATS[qtype].dequantize(torch.from_numpy(stored.view(np.uint8).reshape(1024, -1)))
    assert torch.equal(got.reshape(-1), expected.reshape(-1))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoder_in_pieces_equals_reference_rounded_once(monkeypatch, qtype, dtype):
    """Decoding in pieces (forced small) gives the reference values rounded once to out's dtype."""
    monkeypatch.setitem(decoders.CHUNK_ELEMENTS, "cpu", 512)
    shape = (6, 1024)
    block = FORMATS[qtype]
    blocks = random_blocks(qtype, 6 * 1024 // block.block_size, np.random.default_rng(2))
    dec = BlockDecoder(shape, block=block)
    out = torch.empty(shape, dtype=dtype)
    dec.decode_into(torch.from_numpy(blocks.reshape(-1)), out)
    assert torch.equal(out, dequantize(blocks.reshape(-1), qtype).view(shape).to(dtype))
    assert dec.nbytes == blocks.size and dec.workspace_bytes("cpu") == 512 * decoders.WORK_BYTES_PER_ELEMENT


def test_rows_are_byte_ranges_and_reordering_restores_rows(monkeypatch):
    monkeypatch.setitem(decoders.CHUNK_ELEMENTS, "cpu", 256)
    rng = np.random.default_rng(3)
    blocks = random_blocks("Q8_0", 8 * 2, rng)  # 8 rows of 64 values
    values = dequantize(blocks.reshape(-1), "Q8_0").view(8, 64)
    stored = torch.from_numpy(blocks.reshape(-1))
    dec = BlockDecoder((8, 64), block=FORMATS["Q8_0"])
    start, rows = dec.rows(2, 5)
    out = torch.empty(3, 64)
    rows.decode_into(stored[start : start + rows.nbytes], out)
    assert torch.equal(out, values[2:5])

    swapped = torch.empty(8, 64)
    dec.reordered(RowOrder("swap_halves")).decode_into(stored, swapped)
    assert torch.equal(swapped, torch.cat([values[4:], values[:4]]))


def test_rope_order_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes rows as reshape(heads, 2, half).swapaxes(1, 2); undone here."""
    heads, rows = 2, 8
    model_rows = torch.arange(rows * 4, dtype=torch.float32).view(rows, 4)
    stored = model_rows.view(heads, 2, rows // heads // 2, 4).transpose(1, 2).reshape(rows, 4)
    out = torch.empty(rows, 4)
    ScaledDecoder((rows, 4), dtype=torch.float32).reordered(RowOrder("rope_halves", heads)).decode_into(
        stored.reshape(-1), out
    )
    assert torch.equal(out, model_rows)


def test_scaled_fp8_is_comfyui_dequantize():
    """``w.to(dtype) * scale`` with a float32 scale tensor, as ComfyUI's fp8 layout dequantizes."""
    w = (torch.randn(64, 32) * 100).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0123456, dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = torch.empty(64, 32, dtype=dtype)
        ScaledDecoder((64, 32), dtype=torch.float8_e4m3fn, scale=float(scale)).decode_into(w.reshape(-1), out)
        assert torch.equal(out, w.to(dtype) * scale)


def test_misuse_is_refused():
    dec = BlockDecoder((2, 256), block=FORMATS["Q4_K"])
    with pytest.raises(WeightsError, match="expected 288 bytes of uint8"):
        dec.decode_into(torch.zeros(10, dtype=torch.uint8), torch.empty(2, 256))
    with pytest.raises(WeightsError, match="not a whole number of 256-value blocks"):
        BlockDecoder((3, 100), block=FORMATS["Q4_K"])
    with pytest.raises(WeightsError, match="do not\\s+start and end on a 256-value block"):
        BlockDecoder((4, 128), block=FORMATS["Q4_K"]).rows(1, 2)
    with pytest.raises(ValueError, match="unknown order"):
        RowOrder("sideways")


def test_a_row_order_that_does_not_fit_is_refused_when_the_file_is_opened():
    with pytest.raises(WeightsError, match="a row is not a whole number of 256-value blocks"):
        BlockDecoder((4, 128), block=FORMATS["Q4_K"]).reordered(RowOrder("swap_halves"))
    with pytest.raises(WeightsError, match="do not split into 3 heads"):
        BlockDecoder((8, 256), block=FORMATS["Q4_K"]).reordered(RowOrder("rope_halves", heads=3))
