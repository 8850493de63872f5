"""Quantized checkpoints for tests, written here: GGUF files (with the ``gguf`` package's writer
and quantizers) and ComfyUI-style scaled-fp8 safetensors, from tiny real models.

The ``gguf`` package quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16 itself; for the k-quants it
only dequantizes, so their blocks are drawn at random (codes and 6-bit scales uniform, the fp16
super-block scales sized to the tensor's spread). Tests compare against the ``gguf`` package's
reference dequantization of whatever was written, so random blocks test decoding as well as
quantized real weights would.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

#: Bytes of each k-quant block holding an fp16 scale, and the largest |code × sub-scale| there.
_K_SCALES = {"Q2_K": ((80, 82), 45), "Q3_K": ((108,), 128), "Q4_K": ((0, 2), 945),
             "Q5_K": ((0, 2), 1953), "Q6_K": ((208,), 4096)}
#: The same for the 32-value block types.
_SCALES = {"Q4_0": ((0,), 8), "Q4_1": ((0, 2), 15), "Q5_0": ((0,), 16), "Q5_1": ((0, 2), 31),
           "Q8_0": ((0,), 127), **_K_SCALES}
#: Every quantized GGML type vramfx decodes.
QUANTIZED = tuple(_SCALES)


def random_blocks(qtype: str, count: int, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """``count`` valid blocks of ``qtype``: random codes and sub-scales, finite fp16 scales sized so
    values stay within about ``3 * spread``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(count, type_size), dtype=np.uint8)
    spots, largest = _SCALES[qtype]
    for at in spots:
        d = (rng.uniform(0.5, 1.0, size=count) * 3.0 * spread / largest).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks


def quantize(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``values`` (float32, torch shape) stored as ``qtype``: the array ``GGUFWriter.add_tensor`` takes."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(values, kind)
    block_size = gguf.GGML_QUANT_SIZES[kind][0]
    blocks = random_blocks(qtype, values.size // block_size, rng, spread=float(values.std() or 1.0))
    return blocks.reshape(*values.shape[:-1], -1)


def dequantize(stored: np.ndarray, qtype: str) -> torch.Tensor:
    """The ``gguf`` package's reference values of ``stored`` (float32)."""
    values = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def write_gguf(
    path: Path,
    tensors: Mapping[str, tuple[np.ndarray, str]],
    *,
    arch: str = "llama",
    metadata: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``name -> (float32 values, qtype)`` to a GGUF file; returns each tensor's reference
    dequantized values, as a loader of the file would see them."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    reference = {}
    for name, (values, qtype) in tensors.items():
        stored = quantize(values, qtype, rng)
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, stored, raw_dtype=raw)
        reference[name] = dequantize(stored, qtype).reshape(values.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def qtype_for(name: str, shape: tuple[int, ...], linear: str) -> str:
    """How the community quantizes: matrices whose rows are whole blocks in ``linear``, the rest F32."""
    if len(shape) < 2:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[linear]][0]
    return linear if shape[-1] % block == 0 else "F16"
