"""The interface the runtime reads weights through, and its host-memory implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: str | None = None
    offset: int | None = None  # absolute byte offset of the data in ``file``


@runtime_checkable
class WeightSource(Protocol):
    """Where streamed weights come from: a DiskMap, or host memory.

    ``read_into`` copies the raw bytes of ``key`` into ``out``, a contiguous 1-D uint8 tensor of
    exactly ``info(key).nbytes`` bytes. It must be safe to call from several threads at once.
    """

    def info(self, key: str) -> TensorInfo: ...

    def read_into(self, key: str, out: torch.Tensor) -> None: ...

    def __contains__(self, key: object) -> bool: ...
