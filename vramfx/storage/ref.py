"""WeightRef: one weight bound to the source and key its stored bytes come from.

What the runtime reads: storage-level data that neither the planner nor the front ends need to
reach into. Both front ends (compiled graphs, module swapping) bind their weights to these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vramfx.storage.diskmap import DiskMap
from vramfx.storage.source import WeightSource

if TYPE_CHECKING:
    from vramfx.quant.decoders import Decoder


@dataclass(frozen=True)
class WeightRef:
    """One weight bound to the source and key its bytes come from.

    ``requires_grad`` is the model parameter's flag, which the runtime's copies keep. ``dtype``
    and ``nbytes`` describe the bytes as they are stored and moved; ``compute_dtype`` is the dtype
    the op reads the weight in, when a cast step must turn one into the other.

    A weight with a ``decoder`` (GGUF blocks, scaled fp8, reordered rows) is stored as a flat
    run of ``nbytes`` in ``dtype`` (``decoder.stored_dtype``) and moved and held so; its values,
    of ``shape``, come from ``decoder.decode_into(stored, out)`` into a buffer of
    ``compute_dtype`` — what any engine's cast step calls, :meth:`convert_into`.
    """

    name: str
    source: WeightSource
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool = False
    compute_dtype: torch.dtype | None = None
    decoder: "Decoder | None" = None

    @property
    def casts(self) -> bool:
        """Whether the op reads it through a cast step: decoded, or held in another dtype."""
        return self.decoder is not None or (self.compute_dtype is not None and self.compute_dtype != self.dtype)

    def read_into(self, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy the stored bytes into ``out`` (contiguous uint8 of ``nbytes``)."""
        if bypass_page_cache and is_disk_source(self.source):
            self.source.read_into(self.key, out, bypass_page_cache=True)
        else:
            self.source.read_into(self.key, out)

    def convert_into(self, stored: torch.Tensor, out: torch.Tensor) -> None:
        """Write the values of ``stored`` (the weight as it is held) into ``out``, in ``out``'s
        dtype: decoded by the weight's decoder, else cast as ``stored.to(out.dtype)``."""
        if self.decoder is not None:
            self.decoder.decode_into(stored, out)
        else:
            out.copy_(stored)


def is_disk_source(source: object) -> bool:
    """Whether ``source`` reads weight files, so ``O_DIRECT`` and disk bandwidth apply."""
    return isinstance(source, DiskMap) or bool(getattr(source, "from_disk", False))
