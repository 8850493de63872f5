"""The layer-swap configuration: the 8-field ``vram_config`` dict and ``vram_limit``.

The keys are those of the well-known layer-swap implementation, so its users switch by changing
an import. Each pair names one state of a wrapped module's weights: *offload* (where they rest),
*onload* (where they wait while the model is in use), *preparing* (kept on the compute device
while the limit allows) and *computation* (the dtype and device the op runs in).

The dtype weights rest in (offload, or onload after :func:`vramfx.swap.onload`) decides the
values the op sees; a preparing dtype only decides how kept weights are held, never their values
(see :mod:`vramfx.swap.units`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vramfx.budget import parse_budget

#: A device or dtype of ``"disk"``: the bytes are read from ``disk_map`` on demand.
DISK = "disk"
#: The original counts ``vram_limit`` in units of 1024**3 bytes.
GIGABYTE = 2**30
STATES = ("offload", "onload", "preparing", "computation")
KEYS = tuple(f"{state}_{field}" for state in STATES for field in ("dtype", "device"))


@dataclass(frozen=True)
class Placement:
    """Where one state keeps weights: a device and a dtype, or the disk map.

    ``device is None`` means on disk; a dtype there means the values read are rounded to it
    (unless the file's dtype converts into it exactly). ``dtype is None`` means every tensor
    keeps its own dtype — for the preparing state, the dtype streamed copies are held in; a
    dtype applies to floating-point tensors only (integer tensors are never cast).
    """

    device: torch.device | None
    dtype: torch.dtype | None

    @property
    def on_disk(self) -> bool:
        return self.device is None

    def dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` takes in this placement."""
        if self.dtype is None or not dtype.is_floating_point:
            return dtype
        return self.dtype


@dataclass(frozen=True)
class VramConfig:
    """The four states of a wrapped module's weights, parsed from a ``vram_config`` dict.

    Examples
    --------
    >>> config = VramConfig.from_dict({"offload_device": "disk", "computation_device": "cpu"})
    >>> config.offload.on_disk, config.onload.on_disk, config.preparing.device
    (True, False, device(type='cpu'))
    """

    offload: Placement
    onload: Placement
    preparing: Placement
    computation: Placement

    @property
    def device(self) -> torch.device:
        """The computation device."""
        assert self.computation.device is not None
        return self.computation.device

    @classmethod
    def from_dict(cls, vram_config: Mapping[str, Any] | None) -> "VramConfig":
        """Parse and check the 8 keys; an omitted dtype or device falls back to the computation one.

        Except two dtypes: on ``"disk"`` an omitted dtype is the file's, and an omitted
        ``preparing_dtype`` holds kept weights as streamed ones are held (their stored dtype
        when it is narrower than the computation dtype, cast per call; else the computation
        dtype).

        Raises
        ------
        ValueError
            For an unknown key, a value that is no dtype or device, a ``"disk"`` dtype paired
            with a real device, or a ``"disk"`` preparing or computation state.
        """
        if not isinstance(vram_config, (Mapping, type(None))):
            raise ValueError(f"vram_config must be a dict with keys {', '.join(KEYS)}; got {type(vram_config).__name__}")
        config = dict(vram_config or {})
        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise ValueError(f"vram_config has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(KEYS)}")
        device = _device(config.get("computation_device"), "computation_device")
        if device is None:
            raise ValueError('vram_config["computation_device"] cannot be "disk"; use "cuda" or "cpu"')
        if config.get("computation_dtype") == DISK:
            raise ValueError('vram_config["computation_dtype"] cannot be "disk"; use a torch dtype')
        computation = Placement(device, _dtype(config.get("computation_dtype"), "computation_dtype"))
        placements = {"computation": computation}
        for state in ("offload", "onload", "preparing"):
            placements[state] = _placement(config, state, computation)
        if placements["preparing"].on_disk or placements["preparing"].device != device:
            raise ValueError(
                f'vram_config["preparing_device"] must be the computation device ({device}): it is '
                "where vram_limit keeps weights between calls; omit it to use the computation device"
            )
        return cls(**placements)


def parse_vram_limit(vram_limit: int | float | str | None, device: torch.device) -> int | None:
    """``vram_limit`` in bytes: a number in GB as the original counts them (2**30), or a budget string.

    ``None`` means no limit. ``0`` means nothing is kept and nothing is fetched ahead.

    Examples
    --------
    >>> parse_vram_limit(1.5, torch.device("cpu")), parse_vram_limit("512MiB", torch.device("cpu"))
    (1610612736, 536870912)
    """
    if vram_limit is None:
        return None
    if isinstance(vram_limit, bool):
        raise ValueError(f"vram_limit={vram_limit!r} is a bool; pass a number of GB, a size such as '8GiB', or None")
    if isinstance(vram_limit, numbers.Real):
        if not vram_limit >= 0 or math.isinf(vram_limit):
            raise ValueError(
                f"vram_limit={vram_limit!r} must be a finite number >= 0 (GB, as 2**30 bytes); pass None for no limit"
            )
        return int(float(vram_limit) * GIGABYTE)
    if isinstance(vram_limit, str):
        try:
            return parse_budget(vram_limit, device)
        except ValueError as exc:
            raise ValueError(f"vram_limit: {exc}") from None
    raise ValueError(
        f"vram_limit={vram_limit!r} has type {type(vram_limit).__name__}; pass a number of GB, "
        "a size such as '8GiB' or '90%', or None"
    )


def _placement(config: dict[str, Any], state: str, computation: Placement) -> Placement:
    """One state's placement, with the computation one filling what is omitted (see from_dict)."""
    raw_device, raw_dtype = config.get(f"{state}_device"), config.get(f"{state}_dtype")
    if raw_dtype == DISK and raw_device not in (None, DISK):
        raise ValueError(
            f'vram_config["{state}_device"]={raw_device!r} conflicts with {state}_dtype="disk"; set '
            f'{state}_device to "disk" too, or {state}_dtype to a torch dtype'
        )
    dtype = _dtype(raw_dtype, f"{state}_dtype")
    if DISK in (raw_device, raw_dtype):
        return Placement(None, dtype)
    device = _device(raw_device, f"{state}_device") or computation.device
    return Placement(device, dtype or (None if state == "preparing" else computation.dtype))


def _device(value: Any, key: str) -> torch.device | None:
    """A torch device for ``key``; None for ``"disk"``; the default compute device when omitted."""
    if value == DISK:
        return None
    if value is None:
        if key != "computation_device":
            return None
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f'vram_config["{key}"]={value!r} is not a device; use "cuda", "cpu" or "disk"') from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f'vram_config["{key}"]={value!r}: devices are "cuda", "cpu" or "disk"')
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f'vram_config["{key}"]={value!r}, but CUDA is not available; use "cpu"')
        if device.index is None:  # "cuda" and "cuda:0" must compare equal
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None or value == DISK:
        return None
    if not isinstance(value, torch.dtype):
        raise ValueError(f'vram_config["{key}"]={value!r} is not a torch dtype (e.g. torch.bfloat16) or "disk"')
    return value
