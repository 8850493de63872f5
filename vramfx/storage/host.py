"""Weights already in host memory, served through the same interface as a DiskMap."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from vramfx.storage.source import TensorInfo


class HostSource(Mapping[str, torch.Tensor]):
    """A read-only mapping of tensors in host memory that the runtime can copy from.

    Parameters
    ----------
    tensors:
        Name to tensor. Tensors are made contiguous once, here, so every later copy is a
        plain memcpy.

    Examples
    --------
    >>> src = HostSource({"w": torch.ones(2)})
    >>> out = torch.empty(8, dtype=torch.uint8)
    >>> src.read_into("w", out)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = {k: v.detach().contiguous() for k, v in tensors.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def replace(self, key: str, tensor: torch.Tensor) -> None:
        """Serve ``tensor`` under ``key`` from now on: the model replaced the tensor it holds there
        (an adapter swapped in) between calls. Its shape and dtype must be the old one's."""
        old = self._tensors[key]
        if tensor.shape != old.shape or tensor.dtype != old.dtype:
            raise ValueError(f"{key}: cannot replace a {tuple(old.shape)} {old.dtype} tensor by a "
                             f"{tuple(tensor.shape)} {tensor.dtype} one")
        self._tensors[key] = tensor.detach().contiguous()

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def read_into(self, key: str, out: torch.Tensor) -> None:
        t = self._tensors[key]
        # Byte view, so any dtype copies bit for bit with no conversion.
        out.copy_(t.reshape(-1).view(torch.uint8))
