"""Parse and validate the header of a safetensors file, without reading any tensor data.

Format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
area, which starts at ``8 + N``), then the data area.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.storage.source import TensorInfo

__all__ = ["SAFETENSORS_DTYPES", "read_header"]

# The safetensors library refuses headers above 100 MB; a larger one is corrupt.
MAX_HEADER_BYTES = 100_000_000


def _dtypes() -> dict[str, torch.dtype]:
    """The safetensors dtype names this torch can represent."""
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    return {st: getattr(torch, tn) for st, tn in names.items() if hasattr(torch, tn)}


SAFETENSORS_DTYPES: dict[str, torch.dtype] = _dtypes()


def read_header(fd: int, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check the header of the safetensors file open as ``fd``.

    Parameters
    ----------
    fd:
        A file descriptor open for reading; only ``os.pread`` is used, so its offset is kept.
    path:
        The file's path, for ``TensorInfo.file`` and error messages.
    file_size:
        The file's size in bytes.

    Returns
    -------
    tuple[dict[str, TensorInfo], dict[str, str]]
        Each tensor's info, in the order of its data in the file, with absolute offsets; and the
        file's ``__metadata__`` (empty if none).

    Raises
    ------
    WeightsError
        If the header length runs past the end of the file or over ``MAX_HEADER_BYTES``, the
        JSON is malformed (or nested too deeply, or holds an integer too long to read), a dtype
        is unknown, a shape does not match its byte length, or data
        offsets lie outside the data area or overlap. The message names ``path`` and the tensor.

    Examples
    --------
    >>> import safetensors.torch, tempfile
    >>> p = tempfile.mktemp(suffix=".safetensors")
    >>> safetensors.torch.save_file({"w": torch.zeros(2, 3)}, p)
    >>> fd = os.open(p, os.O_RDONLY)
    >>> infos, _ = read_header(fd, p, os.fstat(fd).st_size)
    >>> infos["w"].shape, infos["w"].nbytes
    ((2, 3), 24)
    >>> os.close(fd)
    """
    if file_size < 8:
        raise WeightsError(
            f"{path}: file is {file_size} bytes, too short for a safetensors header "
            f"(it starts with an 8-byte header length)."
        )
    (header_len,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path))
    if header_len > MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path}: header length {header_len} bytes is over the {MAX_HEADER_BYTES} byte limit "
            f"of safetensors; the file is corrupt or not safetensors."
        )
    if 8 + header_len > file_size:
        raise WeightsError(
            f"{path}: header length {header_len} bytes runs past the end of the file "
            f"({file_size} bytes); the file is truncated or not safetensors."
        )
    raw = _pread_exact(fd, header_len, 8, path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: malformed, or an integer too long to read
        raise WeightsError(f"{path}: header is not valid UTF-8 JSON ({err}).") from None
    except RecursionError:
        raise WeightsError(f"{path}: header JSON is nested too deeply to be a safetensors header.") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is a JSON {type(header).__name__}, expected an object.")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: __metadata__ is not a JSON object.")
    data_start = 8 + header_len
    data_size = file_size - data_start
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        begin, end = _check_entry(name, entry, data_size, path)
        spans.append((begin, end, name))
    _check_no_overlap(spans, path)

    infos: dict[str, TensorInfo] = {}
    for begin, end, name in sorted(spans):
        entry = header[name]
        infos[name] = TensorInfo(
            shape=tuple(entry["shape"]),
            dtype=SAFETENSORS_DTYPES[entry["dtype"]],
            nbytes=end - begin,
            file=path,
            offset=data_start + begin,
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(name: str, entry: Any, data_size: int, path: str) -> tuple[int, int]:
    """Validate one header entry; return its data offsets."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise WeightsError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in the header.")
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise WeightsError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r} (known: {known}).")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise WeightsError(f"{path}: tensor {name!r} has invalid shape {shape!r}.")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise WeightsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}.")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise WeightsError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] outside the data area "
            f"of {data_size} bytes; the file is truncated or corrupt."
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != end - begin:
        raise WeightsError(
            f"{path}: tensor {name!r} has shape {shape} of {dtype_name} ({expected} bytes) "
            f"but data_offsets [{begin}, {end}] span {end - begin} bytes."
        )
    return begin, end


def _check_no_overlap(spans: list[tuple[int, int, str]], path: str) -> None:
    """Raise if two non-empty byte ranges share a byte."""
    prev_end, prev_name = 0, ""
    for begin, end, name in sorted(s for s in spans if s[1] > s[0]):
        if begin < prev_end:
            raise WeightsError(
                f"{path}: the data of tensors {prev_name!r} and {name!r} overlap "
                f"(byte {begin} of the data area is in both)."
            )
        prev_end, prev_name = end, name


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    """``n`` bytes at ``offset``, looping on short reads."""
    parts, done = [], 0
    while done < n:
        chunk = os.pread(fd, n - done, offset + done)
        if not chunk:
            raise WeightsError(f"{path}: unexpected end of file at byte {offset + done}.")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)
