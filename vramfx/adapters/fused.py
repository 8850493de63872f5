"""A LoRA fused into a streamed weight: applied after the fetch, never written to the stored file.

``fuse_lora`` (PEFT's ``merge``) adds ``scale * (B @ A)`` to the base layer's weight. A streamed
base weight is meta in the model, so the merge changes nothing there; instead the compiled graph
reads that weight through a planned cast step (:class:`FusedLora` is its decoder): the stored
weight is fetched as usual, copied into its slot of the upcast region, and every merged adapter's
delta is added there, with PEFT's own op order and dtypes, so the result equals the weight eager's
fused model holds, bit for bit on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Bytes per weight value a fusion takes besides its output: the float32 product and its scaled copy.
_WORK_BYTES_PER_ELEMENT = 8
#: Memory traffic per weight value of one fusion, for the cost model: the copy, the product, the scale, the add.
_TRAFFIC_BYTES_PER_ELEMENT = 24

#: ``(A, B, scale, fan_in_fan_out, widen)`` of each adapter merged into one layer, in merge order
#: (``widen``: :func:`lora_delta`'s).
MergedAdapters = Callable[[], list[tuple[torch.Tensor, torch.Tensor, float, bool, bool]]]


@dataclass(frozen=True, eq=False)
class FusedLora:
    """Decoder of a base weight with LoRA adapters fused into it after the fetch.

    ``inner`` decodes the stored bytes first when the checkpoint stores them encoded (GGUF,
    scaled fp8); else they are cast into the output. ``merged`` gives the adapters' current
    values each time the weight is decoded. ``rank`` is the sum of their ranks, for the
    workspace the fusion takes. ``kept_decoded``: a kept copy of the weight is fused once, when
    it is made resident (:func:`vramfx.runtime.engine.decoded_when_kept`), by a front end that drops
    that copy whenever the merges change; it applies only without ``inner`` (the fusion is then
    made in the stored bytes themselves).
    """

    shape: tuple[int, ...]
    stored_dtype: torch.dtype
    nbytes: int
    merged: MergedAdapters
    rank: int
    inner: object | None = None
    row_order: None = None
    kept_decoded: bool = False

    def __post_init__(self) -> None:
        assert not (self.kept_decoded and self.inner is not None), "an encoded weight is decoded per cast"

    @property
    def format(self) -> str:
        inner = getattr(self.inner, "format", None)
        return f"{inner}+lora" if inner else "lora-fused"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def workspace_bytes(self, device: torch.device | str) -> int:
        adapters = self.rank * sum(self.shape) * 4 * 2
        inner = self.inner.workspace_bytes(device) if self.inner is not None else 0
        return max(inner, self.numel * _WORK_BYTES_PER_ELEMENT + adapters)

    def traffic_bytes(self) -> int:
        inner = self.inner.traffic_bytes() if self.inner is not None else self.nbytes
        return inner + self.numel * _TRAFFIC_BYTES_PER_ELEMENT

    def decode_into(self, stored: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = the stored weight plus each merged adapter's ``scale * (B @ A)``, as PEFT merges."""
        if self.inner is not None:
            self.inner.decode_into(stored, out)
        else:
            out.copy_(stored.view(self.shape))
        for a, b, scale, fan_in_fan_out, widen in self.merged():
            out += lora_delta(a.to(out.device), b.to(out.device), scale, fan_in_fan_out, widen=widen)


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False, *, widen: bool = True
) -> torch.Tensor:
    """``scale * (B @ A)`` in PEFT's dtypes: half-precision factors on a CPU are multiplied in
    float32 and the product rounded back, as ``LoraLayer.get_delta_weight`` does (``widen``);
    else in their own dtype, as DiffSynth-Studio's LoRA loader does.

    Examples
    --------
    >>> lora_delta(torch.ones(2, 3), torch.ones(4, 2), 0.5).shape
    torch.Size([4, 3])
    """
    dtype = b.dtype
    widen = widen and b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if widen:
        a, b = a.float(), b.float()
    product = b @ a
    delta = (product.T if fan_in_fan_out else product) * scale
    return delta.to(dtype) if widen else delta
