"""A weight source served in other dtypes than it holds: each tensor converted once, in host memory.

For a source whose file is not in the storage dtype, each weight is read and converted the first
time the runtime asks for it, and its converted bytes are kept for every later read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch

from vramfx.storage.source import TensorInfo, WeightSource

__all__ = ["ConvertedSource", "read_stored", "serve_converted"]


class ConvertedSource:
    """A weight source whose tensors are converted to other dtypes once, and then kept in host memory.

    Parameters
    ----------
    source:
        Where the original bytes come from (a DiskMap, host tensors).
    dtypes:
        Key to the dtype it is served in; keys it omits are not served.

    Examples
    --------
    >>> from vramfx.storage.host import HostSource
    >>> src = ConvertedSource(HostSource({"w": torch.ones(4)}), {"w": torch.bfloat16})
    >>> src.info("w").nbytes
    8
    """

    def __init__(self, source: WeightSource, dtypes: Mapping[str, torch.dtype]) -> None:
        self._source = source
        self._dtypes = dict(dtypes)
        self._converted: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._dtypes

    @property
    def source(self) -> WeightSource:
        """Where the original bytes come from."""
        return self._source

    def add(self, key: str, dtype: torch.dtype) -> None:
        """Serve ``key`` in ``dtype`` too."""
        self._dtypes[key] = dtype

    def info(self, key: str) -> TensorInfo:
        stored = self._source.info(key)
        dtype = self._dtypes[key]
        return TensorInfo(tuple(stored.shape), dtype, math.prod(stored.shape) * dtype.itemsize)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self._tensor(key).reshape(-1).view(torch.uint8))

    def convert_all(self) -> None:
        """Convert every tensor served now, so no later read pays for it (or grows memory)."""
        for key in self._dtypes:
            self._tensor(key)

    def _tensor(self, key: str) -> torch.Tensor:
        tensor = self._converted.get(key)
        if tensor is not None:
            return tensor
        # The reader thread and the resident load may ask for one key at once: convert it once.
        with self._lock:
            tensor = self._converted.get(key)
            if tensor is None:
                tensor = read_stored(self._source, key).to(self._dtypes[key]).contiguous()
                self._converted[key] = tensor
        return tensor


def serve_converted(
    cache: dict[int, ConvertedSource], source: WeightSource, key: str, dtype: torch.dtype
) -> ConvertedSource:
    """``cache``'s converted view of ``source`` (made on first use), now serving ``key`` in ``dtype``."""
    converted = cache.get(id(source))
    if converted is None:
        converted = cache[id(source)] = ConvertedSource(source, {})
    converted.add(key, dtype)
    return converted


def read_stored(source: WeightSource, key: str) -> torch.Tensor:
    """The stored tensor ``key``, read whole through ``read_into``."""
    info = source.info(key)
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    source.read_into(key, raw)
    return raw.view(info.dtype).reshape(info.shape)
