"""What a wrapped linear computes besides ``F.linear``: an fp8 matmul, and hot-loaded LoRA adapters.

Both follow the well-known layer-swap implementation's arithmetic step for step (the same ops in
the same order and dtypes), so a model switched to vramfx gives the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch

#: Computation dtypes that make a wrapped linear's matmul run in fp8.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` in fp8, the matmul in fp8 (``torch._scaled_mm``).

    Each row of ``x`` is divided by its scale ``max(|row| / fp8 max, 1)`` (plus 1e-8), so it fits
    the fp8 range and is never scaled up, and cast to ``weight``'s fp8 dtype; the matmul applies the
    row scales to its result, in ``x``'s dtype; ``bias`` is added in bfloat16.

    Examples
    --------
    >>> w = torch.eye(3).to(torch.float8_e4m3fn)
    >>> fp8_linear(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 1000.0]]), w)  # the second row is scaled
    tensor([[1.0000e+00, 2.0000e+00, 3.0000e+00],
            [9.7656e-01, 1.9531e+00, 1.0000e+03]])
    """
    dtype = weight.dtype
    rows = x.reshape(-1, x.shape[-1])
    largest = rows.abs().max(dim=-1, keepdim=True).values
    row_scale = (largest / torch.finfo(dtype).max).clamp(min=1.0).float().to(x.device)
    quantized = (rows / (row_scale + 1e-8)).to(dtype)
    weight_scale = torch.ones((weight.shape[0], 1)).to(x.device)
    out = torch._scaled_mm(
        quantized,
        weight.T,
        scale_a=row_scale,
        scale_b=weight_scale.T,
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])


def lora_forward(layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with ``layer``'s hot-loaded adapters applied (``lora_A_weights``, ``lora_B_weights``,
    ``lora_merger``)."""
    pairs = list(zip(layer.lora_A_weights, layer.lora_B_weights))
    if layer.lora_merger is not None:
        return layer.lora_merger(out, torch.stack([x @ a.T @ b.T for a, b in pairs]))
    for a, b in pairs:
        out = out + x @ a.T.to(device=x.device, dtype=x.dtype) @ b.T.to(device=x.device, dtype=x.dtype)
    return out
