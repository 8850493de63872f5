"""WeightRef: one weight bound to the source and key its stored bytes come from.

What the runtime reads: storage-level data that neither the planner nor the front ends need to
reach into. Both front ends (compiled graphs, module swapping) bind their weights to these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vramfx.storage.diskmap import DiskMap
from vramfx.storage.source import WeightSource


@dataclass(frozen=True)
class WeightRef:
    """One weight bound to the source and key its bytes come from.

    ``requires_grad`` is the model parameter's flag, which the runtime's copies keep. ``dtype``
    and ``nbytes`` describe the bytes as they are stored and moved; ``compute_dtype`` is the dtype
    the graph reads the weight in, when a cast step must turn one into the other.
    """

    name: str
    source: WeightSource
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool = False
    compute_dtype: torch.dtype | None = None

    def read_into(self, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy the stored bytes into ``out`` (contiguous uint8 of ``nbytes``)."""
        if bypass_page_cache and _is_disk(self.source):
            self.source.read_into(self.key, out, bypass_page_cache=True)
        else:
            self.source.read_into(self.key, out)


def _is_disk(source: object) -> bool:
    return isinstance(source, DiskMap)
