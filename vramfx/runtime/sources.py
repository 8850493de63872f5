"""Reading any byte range of a weight, wherever it is stored, into a staging buffer.

The CUDA engine moves large weights through fixed-size staging slots, so it reads ranges, not
whole tensors: host tensors are sliced (no copy until the one into the slot), a DiskMap (or a view
of one: GGUF, scaled fp8) reads the range from its file, and any other source is read whole and
sliced.
"""

from __future__ import annotations

import torch

from vramfx.storage.diskmap import DiskMap
from vramfx.storage.host import HostSource
from vramfx.storage.ref import WeightRef
from vramfx.storage.views import ViewSource


def host_bytes(ref: WeightRef) -> torch.Tensor | None:
    """The weight's bytes as a flat uint8 CPU tensor viewing its memory, when it lives in host
    memory contiguously; else None."""
    if not isinstance(ref.source, HostSource):
        return None
    tensor = ref.source[ref.key].detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return tensor.reshape(-1).view(torch.uint8)


def on_device(ref: WeightRef, device: torch.device) -> torch.Tensor | None:
    """The weight's stored tensor when it already lies on ``device`` as stored (a home the model
    keeps there): used where it lies, never copied. None otherwise."""
    if not isinstance(ref.source, HostSource):
        return None
    tensor = ref.source[ref.key].detach()
    if tensor.device != device or tensor.dtype != ref.dtype or not tensor.is_contiguous():
        return None
    return tensor


def mapped_bytes(ref: WeightRef) -> torch.Tensor | None:
    """The weight's stored bytes as a flat uint8 tensor over a mapping of its file, to be used
    where they lie (:meth:`vramfx.DiskMap.mapped`); None when it is not read straight from a
    DiskMap or its data is not aligned in the file."""
    if not isinstance(ref.source, DiskMap):
        return None
    info = ref.source.info(ref.key)
    if info.nbytes != ref.nbytes or info.dtype != ref.dtype:
        return None
    return ref.source.mapped(ref.key)


def read_range(ref: WeightRef, start: int, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
    """Copy bytes ``[start, start + out.numel())`` of ``ref``'s stored data into ``out``.

    Parameters
    ----------
    ref:
        The weight.
    start:
        First byte to read.
    out:
        A contiguous CPU uint8 tensor (a staging slot, usually pinned).
    bypass_page_cache:
        For a DiskMap, read with ``O_DIRECT``.

    Examples
    --------
    >>> slot = torch.empty(1024, dtype=torch.uint8)  # doctest: +SKIP
    >>> read_range(ref, 4096, slot)  # doctest: +SKIP
    """
    data = host_bytes(ref)
    if data is not None:
        out.copy_(data[start : start + out.numel()])
    elif isinstance(ref.source, (DiskMap, ViewSource)):
        ref.source.read_range_into(ref.key, start, out, bypass_page_cache=bypass_page_cache)
    elif hasattr(ref.source, "read_range_into"):  # a source that reads ranges itself (converted)
        ref.source.read_range_into(ref.key, start, out)
    elif start == 0 and out.numel() == ref.nbytes:
        ref.read_into(out, bypass_page_cache=bypass_page_cache)
    else:
        # A source that can only read whole tensors: bounded by the largest weight, not the model.
        full = torch.empty(ref.nbytes, dtype=torch.uint8)
        ref.read_into(full, bypass_page_cache=bypass_page_cache)
        out.copy_(full[start : start + out.numel()])
