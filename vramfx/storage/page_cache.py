"""Which pages of a file the page cache holds now (``mincore`` over a mapping of the file).

A plan on a CPU chooses how each weight reaches the kernels by what is cached: bytes the page
cache holds are used where they lie, bytes it does not are read from the disk. Linux only (by
``ctypes``); elsewhere the answer is None, "unknown", which the planner takes as cached.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys

logger = logging.getLogger(__name__)

_PROT_READ = 0x1
_MAP_SHARED = 0x01


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        return libc
    except (OSError, AttributeError):
        return None


def cached_pages(fd: int, size: int) -> bytes | None:
    """One byte per page of the file's first ``size`` bytes, odd when the page cache holds that
    page; None where it cannot be asked (not Linux, or the call failed). Maps the file without
    touching it, so asking reads nothing and caches nothing."""
    if size <= 0:
        return b""
    libc = _libc()
    if libc is None:
        return None
    addr = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        logger.debug("mmap for mincore failed: %s", os.strerror(ctypes.get_errno()))
        return None
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
            logger.debug("mincore failed: %s", os.strerror(ctypes.get_errno()))
            return None
        return vec.raw[:pages]
    finally:
        libc.munmap(addr, size)


def cached_fraction(pages: bytes, offset: int, nbytes: int) -> float:
    """The fraction of the pages under bytes ``[offset, offset + nbytes)`` that ``pages``
    (:func:`cached_pages`) marks cached; 1.0 for no bytes.

    Examples
    --------
    >>> cached_fraction(bytes([1, 0, 1, 1]), 0, 2 * mmap.PAGESIZE)
    0.5
    """
    if nbytes <= 0:
        return 1.0
    first, last = offset // mmap.PAGESIZE, (offset + nbytes - 1) // mmap.PAGESIZE
    span = pages[first : last + 1]
    return sum(b & 1 for b in span) / max(1, last - first + 1)
