"""A weight source served in other dtypes than it holds: the one place stored values are rounded.

Both front ends read weights through it when their source holds another dtype than they store in:
compiled graphs with a ``storage_dtype`` (converted once, then kept in host memory: every call
reads the converted bytes), and the layer-swap path, whose weights rest in their offload state
and are rounded on every read (no second copy of the model in host memory). A tensor may pass
through several dtypes (an fp32 file offloaded to fp16 and moved as bf16); each step is a plain
``Tensor.to``, so the values are those of eager doing the same conversions.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import torch

from vramfx.forks import renew_after_fork
from vramfx.progress import step

from vramfx.storage.source import TensorInfo, WeightSource

__all__ = ["ConvertedSource", "read_stored", "serve_converted"]

Dtypes = torch.dtype | Sequence[torch.dtype]


class ConvertedSource:
    """A weight source whose tensors are served converted to other dtypes.

    Parameters
    ----------
    source:
        Where the original bytes come from (a DiskMap, host tensors).
    dtypes:
        Key to the dtype it is served in (or the dtypes it is converted through, in order); keys
        it omits are not served.
    keep:
        Convert each tensor once and keep it in host memory (True), or convert on every read,
        holding nothing (False).

    Examples
    --------
    >>> from vramfx.storage.host import HostSource
    >>> src = ConvertedSource(HostSource({"w": torch.ones(4)}), {"w": torch.bfloat16})
    >>> src.info("w").nbytes
    8
    >>> third = HostSource({"w": torch.full((2,), 1 / 3)})
    >>> rounded = ConvertedSource(third, {"w": (torch.float16, torch.bfloat16)}, keep=False)  # per read
    >>> out = torch.empty(4, dtype=torch.uint8); rounded.read_into("w", out); out.view(torch.bfloat16)
    tensor([0.3340, 0.3340], dtype=torch.bfloat16)
    """

    def __init__(self, source: WeightSource, dtypes: Mapping[str, Dtypes], *, keep: bool = True) -> None:
        self._source = source
        self._dtypes: dict[str, tuple[torch.dtype, ...]] = {}
        for key, chain in dtypes.items():
            self.add(key, chain)
        self.keep = keep
        self._converted: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # A reader thread converting when the parent forked holds the lock forever here.
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._dtypes

    @property
    def source(self) -> WeightSource:
        """Where the original bytes come from."""
        return self._source

    def dtypes(self, key: str) -> tuple[torch.dtype, ...]:
        """The dtypes ``key`` is converted through, in order."""
        return self._dtypes[key]

    def add(self, key: str, dtypes: Dtypes) -> None:
        """Serve ``key`` converted to ``dtypes`` (one dtype, or several in order) too."""
        chain = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
        assert chain, "a conversion needs at least one dtype"
        self._dtypes[key] = chain

    def info(self, key: str) -> TensorInfo:
        stored = self._source.info(key)
        dtype = self._dtypes[key][-1]
        return TensorInfo(tuple(stored.shape), dtype, math.prod(stored.shape) * dtype.itemsize)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self._tensor(key).reshape(-1).view(torch.uint8))

    def read_range_into(self, key: str, start: int, out: torch.Tensor, **_: object) -> None:
        """Bytes ``[start, start + out.numel())`` of ``key`` as served; without ``keep``, only the
        elements they cover are read and converted."""
        itemsize = self._dtypes[key][-1].itemsize
        if self.keep or start % itemsize or out.numel() % itemsize:
            out.copy_(self._tensor(key).reshape(-1).view(torch.uint8)[start : start + out.numel()])
            return
        first, count = start // itemsize, out.numel() // itemsize
        stored = self._source.info(key)
        size = stored.dtype.itemsize
        raw = torch.empty(count * size, dtype=torch.uint8)
        read_range = getattr(self._source, "read_range_into", None)
        if read_range is not None:
            read_range(key, first * size, raw)
        else:
            raw.copy_(read_stored(self._source, key).reshape(-1).view(torch.uint8)[first * size : (first + count) * size])
        out.view(self._dtypes[key][-1]).copy_(_through(raw.view(stored.dtype), self._dtypes[key]))

    def convert_all(self) -> None:
        """Convert every tensor served now, so no later read pays for it (or grows memory)."""
        if self.keep:
            with step("converting weights to their storage dtype", total=len(self._dtypes)) as advance:
                for key in self._dtypes:
                    self._tensor(key)
                    advance()

    def _tensor(self, key: str) -> torch.Tensor:
        if not self.keep:
            return _through(read_stored(self._source, key), self._dtypes[key])
        tensor = self._converted.get(key)
        if tensor is not None:
            return tensor
        # The reader thread and the resident load may ask for one key at once: convert it once.
        with self._lock:
            tensor = self._converted.get(key)
            if tensor is None:
                tensor = _through(read_stored(self._source, key), self._dtypes[key])
                self._converted[key] = tensor
        return tensor


def _through(tensor: torch.Tensor, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    for dtype in dtypes:
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def serve_converted(
    cache: dict[int, ConvertedSource], source: WeightSource, key: str, dtypes: Dtypes, *, keep: bool = True
) -> ConvertedSource:
    """``cache``'s converted view of ``source`` (made on first use), now serving ``key`` in ``dtypes``."""
    converted = cache.get(id(source))
    if converted is None:
        converted = cache[id(source)] = ConvertedSource(source, {}, keep=keep)
    converted.add(key, dtypes)
    return converted


def read_stored(source: WeightSource, key: str) -> torch.Tensor:
    """The stored tensor ``key``, read whole through ``read_into``."""
    info = source.info(key)
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    source.read_into(key, raw)
    return raw.view(info.dtype).reshape(info.shape)
