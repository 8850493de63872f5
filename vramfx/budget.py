"""Budget parsing and device memory queries.

A budget is a number of bytes on the compute device. Users write it the way they write
accelerate's ``max_memory``: ``8_000_000_000``, ``"8GB"``, ``"8GiB"``, ``"512MiB"`` or
``"90%"`` of the memory the device has free right now.
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction

import torch

logger = logging.getLogger(__name__)

__all__ = ["device_free_bytes", "parse_budget", "rss_anon_bytes"]

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?i?B)\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")

_ACCEPTED = (
    "an int number of bytes (8_000_000_000), a size string with a unit "
    "(B, KB, MB, GB, TB = powers of 10; KiB, MiB, GiB, TiB = powers of 2; "
    'e.g. "8GB", "8GiB", "512MB", "1.5GB"), or a percentage of the device\'s free '
    'memory ("90%")'
)


def parse_budget(budget: int | str, device: torch.device | str | None = None) -> int:
    """Turn a user's budget into a number of bytes.

    Parameters
    ----------
    budget:
        An ``int`` number of bytes; a size string such as ``"8GB"`` (10^9 bytes per GB),
        ``"8GiB"`` (2^30 bytes per GiB), ``"512MB"``, ``"512MiB"``, ``"1.5GB"``, ``"64KB"`` or
        ``"64KiB"`` (units as in accelerate's ``max_memory`` and case-insensitive, except that
        ``"8Gb"``, which accelerate reads as gigabits, is refused); or a percentage ``"90%"`` of the
        device's free memory.
    device:
        The compute device a percentage refers to. ``None`` means ``"cuda"`` when CUDA is
        available, else ``"cpu"``. Ignored for absolute budgets.

    Returns
    -------
    int
        The budget in bytes, always positive.

    Raises
    ------
    ValueError
        If ``budget`` is none of the accepted forms, or not positive. The message lists the
        accepted forms.

    Examples
    --------
    >>> parse_budget("8GB")
    8000000000
    >>> parse_budget("1.5GiB")
    1610612736
    >>> parse_budget(4096)
    4096
    """
    if isinstance(budget, bool):  # bool is an int subclass; True bytes is a bug upstream.
        raise ValueError(f"budget={budget!r} is a bool; expected {_ACCEPTED}.")
    if isinstance(budget, int):
        return _positive(budget, budget)
    if not isinstance(budget, str):
        raise ValueError(f"budget={budget!r} has type {type(budget).__name__}; expected {_ACCEPTED}.")

    percent = _PERCENT_RE.match(budget)
    if percent:
        fraction = float(percent.group(1)) / 100
        if not 0 < fraction <= 1:
            raise ValueError(f"budget={budget!r}: a percentage must be in (0%, 100%].")
        free = device_free_bytes(device)
        return _positive(int(free * fraction), budget)

    size = _SIZE_RE.match(budget)
    if size is None:
        raise ValueError(f"budget={budget!r} is not understood; expected {_ACCEPTED}.")
    number, unit = size.groups()
    if unit.endswith("b") and "i" not in unit.lower():  # accelerate reads "8Gb" as gigabits
        raise ValueError(
            f"budget={budget!r}: a lower-case 'b' means bits; write {number}{unit[:-1].upper()}B "
            f"for bytes. Expected {_ACCEPTED}."
        )
    # Exact decimal arithmetic: "8.2MB" is 8,200,000 bytes, not float's 8,199,999.
    return _positive(int(Fraction(number) * _UNITS[unit.upper()]), budget)


def device_free_bytes(device: torch.device | str | None = None) -> int:
    """Bytes free on ``device`` now: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on CPU.

    Parameters
    ----------
    device:
        ``None`` means ``"cuda"`` when CUDA is available, else ``"cpu"``.

    Returns
    -------
    int
        Free bytes as the operating system or the CUDA driver reports them.

    Raises
    ------
    ValueError
        For a device type other than ``cpu`` and ``cuda``.

    Examples
    --------
    >>> device_free_bytes("cpu") > 0
    True
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "cpu":
        return _cpu_available_bytes()
    raise ValueError(f"device={device!r}: free memory is known for 'cpu' and 'cuda' devices only.")


def rss_anon_bytes() -> int:
    """The process's anonymous resident memory (``RssAnon``), what a CPU budget is checked against.

    File-backed pages (a mapped weights file, shared libraries) are not counted: the kernel can
    drop them at any time. Returns 0 where ``/proc/self/status`` does not exist.

    Examples
    --------
    >>> rss_anon_bytes() >= 0
    True
    """
    return _proc_bytes("/proc/self/status", "RssAnon:") or 0


def rss_file_bytes() -> int:
    """The process's file-backed resident memory (``RssFile``): among it, the page-cache pages of
    weights used in place, which a CPU budget does not count (the kernel may reclaim them).
    Returns 0 where ``/proc/self/status`` does not exist.

    Examples
    --------
    >>> rss_file_bytes() >= 0
    True
    """
    return _proc_bytes("/proc/self/status", "RssFile:") or 0


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """The device a relative budget refers to."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo, or free physical pages where that file is missing."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available
    logger.warning("No MemAvailable in /proc/meminfo; using free physical pages instead.")
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file in bytes, or None where the file or field is missing."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _positive(nbytes: int, budget: object) -> int:
    """``nbytes`` if positive, else a ValueError naming the user's ``budget``."""
    if nbytes <= 0:
        raise ValueError(f"budget={budget!r} gives {nbytes} bytes; a budget must be positive.")
    return nbytes
