"""DiskMap: a lazy, read-only mapping over safetensors weights that reads only what is asked for."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vramfx.arguments import require_device
from vramfx.errors import WeightsError
from vramfx.forks import renew_after_fork
from vramfx.storage.files import PathLike, open_regular, resolve_safetensors
from vramfx.storage.safetensors_header import read_header
from vramfx.storage.source import TensorInfo

logger = logging.getLogger(__name__)

__all__ = ["DiskMap"]

# O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size;
# 4096 covers every common disk and filesystem.
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 8 << 20
#: Where a mapped tensor's data must start in its file to be used in place: torch's CPU
#: allocator aligns to 64 bytes, and kernels may take other paths at other alignments.
MAPPED_ALIGNMENT = 64

KeyMap = Mapping[str, str] | Callable[[str], "str | None"]


@dataclass
class _File:
    """One open safetensors file and the identity it had when opened."""

    path: str
    fd: int
    size: int
    mtime_ns: int
    dev: int
    ino: int
    direct_fd: int | None = None
    direct_ok: bool = True
    mapping: torch.Tensor | None = None  # the whole file, mapped copy-on-write (see DiskMap.mapped)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DiskMap(Mapping[str, torch.Tensor]):
    """A read-only ``Mapping[str, Tensor]`` over safetensors files that reads each tensor on demand.

    ``dm[key]`` reads only that tensor's byte range with ``os.pread`` (no file mapping) into
    fresh memory that torch allocated, so it is aligned as torch's own tensors are (64 bytes on
    CPU; CPU kernels take different paths by pointer alignment, so this keeps results
    bit-identical to a model built in memory). Shapes, dtypes and byte ranges are known without
    reading any data: see :meth:`info`.

    Only safetensors can be streamed like this; pickle checkpoints (``.bin``, ``.pt``) must be
    loaded whole with :func:`vramfx.load_state_dict`.

    Parameters
    ----------
    source:
        A ``.safetensors`` file; a list of them; a sharded checkpoint's ``*.index.json``; or a
        folder, meaning its ``*.index.json`` if it has one, else all its ``*.safetensors`` files.
    device:
        Where ``dm[key]`` puts tensors.
    dtype:
        If given, ``dm[key]`` casts floating-point tensors to it; other dtypes are kept.
        :meth:`info` and :meth:`read_into` always describe and copy the stored bytes.
    key_map:
        Renames keys: a dict (keys it does not mention keep their name) or a callable from the
        stored name to the new one (returning ``None`` drops the key).

    Raises
    ------
    WeightsError
        At construction, if a file is not valid safetensors (header length past the end of the
        file, data offsets outside the data area or overlapping, unknown dtype, shape not
        matching the byte length), if an index names a missing shard or a tensor its shard does
        not hold, or if a key is in two files (both are named). On a read, if a file's size or
        modification time changed since it was opened.

    Notes
    -----
    Each file is opened once, at construction, and closed by :meth:`close`, by leaving a
    ``with`` block, or when the DiskMap is garbage collected. A failed construction leaves no
    file open. Reads are thread-safe. A DiskMap pickles as its constructor arguments: unpickling
    reopens the files and checks they are unchanged (a lambda ``key_map`` cannot be pickled).

    Examples
    --------
    >>> import tempfile, safetensors.torch
    >>> path = tempfile.mktemp(suffix=".safetensors")
    >>> safetensors.torch.save_file({"w": torch.ones(2, 3), "b": torch.zeros(3)}, path)
    >>> with DiskMap(path, key_map={"w": "weight"}) as dm:
    ...     print(sorted(dm), dm.info("weight").shape, dm.nbytes)
    ...     print(dm["weight"].sum().item())
    ['b', 'weight'] (2, 3) 36
    6.0
    """

    def __init__(
        self,
        source: PathLike | Sequence[PathLike],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        key_map: KeyMap | None = None,
    ):
        self._files: list[_File] = []
        self._closed = False
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch.dtype (e.g. torch.bfloat16).")
        if key_map is not None and not (isinstance(key_map, Mapping) or callable(key_map)):
            raise ValueError(f"key_map={key_map!r} must be a dict or a callable from old to new name.")
        self._args = (source, device, dtype, key_map)
        self.device = require_device("device", device)
        self.dtype = dtype
        self._local = threading.local()
        self._warn_lock = threading.Lock()
        self._warned_direct = False
        self._entries: dict[str, tuple[_File, TensorInfo]] = {}
        try:
            self._open(source, key_map)
        except BaseException:
            self.close()
            raise
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # Locks a reader thread held when the parent forked stay locked forever in the child;
        # the descriptors stay valid there (reads are pread: no shared file offset).
        self._warn_lock = threading.Lock()
        for f in self._files:
            f.lock = threading.Lock()

    def _open(self, source: PathLike | Sequence[PathLike], key_map: KeyMap | None) -> None:
        """Open every file, read and check its header, and build the key table."""
        layout = resolve_safetensors(source)
        stored: dict[str, tuple[_File, TensorInfo]] = {}
        for path in layout.files:
            f = self._open_file(path)
            infos, _metadata = read_header(f.fd, f.path, f.size)
            for name, info in infos.items():
                if name in stored:
                    raise WeightsError(
                        f"tensor {name!r} is in two files: {stored[name][0].path} and {f.path}."
                    )
                stored[name] = (f, info)
        if layout.weight_map is not None:
            for name, shard in layout.weight_map.items():
                if name not in stored or Path(stored[name][0].path) != shard:
                    raise WeightsError(
                        f"{layout.index} maps tensor {name!r} to {shard.name}, which does not hold it."
                    )
        for name, entry in stored.items():
            new = _rename(name, key_map)
            if new is None:
                continue
            if new in self._entries:
                raise WeightsError(f"key_map renames two tensors to {new!r}; the second is {name!r}.")
            self._entries[new] = entry

    def _open_file(self, path: Path) -> _File:
        """Open ``path`` read-only, if it is a regular file, and record its identity."""
        fd = open_regular(path)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        f = _File(str(path), fd, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
        self._files.append(f)
        return f

    # -- Mapping -----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> torch.Tensor:
        _f, info = self._entries[key]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(key, raw)
        tensor = raw.view(info.dtype).reshape(info.shape)
        if self.dtype is not None and info.dtype.is_floating_point:
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (
            f"DiskMap({len(self._files)} file(s), {len(self)} tensors, {self.nbytes / 1e6:.1f} MB"
            f"{', closed' if self._closed else ''})"
        )

    # -- What is known without reading -------------------------------------------------------

    def info(self, key: str) -> TensorInfo:
        """Shape, stored dtype, byte length, file and absolute offset of ``key``, read from headers.

        Examples
        --------
        >>> dm.info("model.embed_tokens.weight").nbytes  # doctest: +SKIP
        1048576
        """
        return self._entries[key][1]

    @property
    def nbytes(self) -> int:
        """Total stored bytes of all keys."""
        return sum(info.nbytes for _f, info in self._entries.values())

    @property
    def files(self) -> list[str]:
        """The files this DiskMap reads, in order."""
        return [f.path for f in self._files]

    # -- Reading -----------------------------------------------------------------------------

    def read_into(self, key: str, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy the stored bytes of ``key`` straight into ``out``, with no intermediate tensor.

        Safe to call from several threads at once; the reads release the GIL.

        Parameters
        ----------
        key:
            The tensor to read.
        out:
            A contiguous CPU ``uint8`` tensor (pinned or not) of exactly ``info(key).nbytes``.
        bypass_page_cache:
            Read through a separate ``O_DIRECT`` descriptor so the data does not stay in the page
            cache (a model larger than RAM then streams from disk as it would cold). Falls back
            to normal reads, with one warning, where the filesystem refuses ``O_DIRECT``.

        Raises
        ------
        WeightsError
            If the file changed (size or mtime) since it was opened, or ends early.
        ValueError
            If ``out`` is not a contiguous CPU uint8 tensor of the right size, or the DiskMap is
            closed.

        Examples
        --------
        >>> out = torch.empty(dm.info("w").nbytes, dtype=torch.uint8)  # doctest: +SKIP
        >>> dm.read_into("w", out)  # doctest: +SKIP
        """
        self._check_out(key, 0, out, whole=True)
        self._read_span(key, 0, out, bypass_page_cache)

    def read_range_into(self, key: str, start: int, out: torch.Tensor, *, bypass_page_cache: bool = False) -> None:
        """Copy bytes ``[start, start + out.numel())`` of ``key``'s stored data into ``out``.

        For runtimes that move a large tensor through fixed-size buffers. Same guarantees and
        errors as :meth:`read_into`.

        Examples
        --------
        >>> out = torch.empty(1024, dtype=torch.uint8)  # doctest: +SKIP
        >>> dm.read_range_into("w", 4096, out)  # bytes 4096..5119 of w  # doctest: +SKIP
        """
        self._check_out(key, start, out, whole=False)
        self._read_span(key, start, out, bypass_page_cache)

    def _check_out(self, key: str, start: int, out: torch.Tensor, *, whole: bool) -> None:
        """Raise unless ``out`` can take ``key``'s bytes (all of them, or a range from ``start``)."""
        nbytes = self._entries[key][1].nbytes
        ok = isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.device.type == "cpu"
        ok = ok and out.is_contiguous()
        ok = ok and (out.numel() == nbytes if whole else 0 <= start and start + out.numel() <= nbytes)
        if not ok:
            wanted = f"of {nbytes} bytes for {key!r}" if whole else f"within the {nbytes} bytes of {key!r} from byte {start}"
            raise ValueError(
                f"out must be a contiguous CPU uint8 tensor {wanted}; got {type(out).__name__} "
                f"{getattr(out, 'dtype', '')} {tuple(getattr(out, 'shape', ()))} on {getattr(out, 'device', '?')}."
            )

    def _read_span(self, key: str, start: int, out: torch.Tensor, bypass_page_cache: bool) -> None:
        """Read ``out.numel()`` bytes of ``key`` from byte ``start`` into ``out`` (checked by the caller)."""
        f, info = self._entries[key]
        if self._closed:
            raise ValueError(f"DiskMap is closed; cannot read {key!r}.")
        self._check_unchanged(f)
        nbytes = out.numel()
        if nbytes == 0:
            return
        assert info.offset is not None
        offset = info.offset + start
        if bypass_page_cache and self._direct_fd(f) is not None:
            try:
                self._read_direct(f, offset, nbytes, out.data_ptr())
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._refuse_direct(f, err)
        _pread_into(f.fd, offset, nbytes, out.data_ptr(), f.path)

    def _check_unchanged(self, f: _File) -> None:
        """Raise if ``f`` was modified or replaced since it was opened (fstat is cheap)."""
        st = os.fstat(f.fd)
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            raise WeightsError(
                f"{f.path} changed since it was opened (size {f.size} -> {st.st_size} bytes, "
                f"mtime {f.mtime_ns} -> {st.st_mtime_ns} ns); reopen the DiskMap (and recompile) "
                f"to read it."
            )
        try:
            on_disk = os.stat(f.path)
        except FileNotFoundError:
            raise WeightsError(
                f"{f.path} was removed since it was opened; reopen the DiskMap (and recompile)."
            ) from None
        if (on_disk.st_dev, on_disk.st_ino) != (f.dev, f.ino):
            raise WeightsError(
                f"{f.path} was replaced by another file since it was opened; reopen the DiskMap "
                f"(and recompile) to read it."
            )

    def _direct_fd(self, f: _File) -> int | None:
        """The file's O_DIRECT descriptor, opened on first use; None where O_DIRECT is refused."""
        if not f.direct_ok:
            return None
        if f.direct_fd is not None:
            return f.direct_fd
        with f.lock:
            if f.direct_fd is None and f.direct_ok:
                if not hasattr(os, "O_DIRECT"):
                    self._refuse_direct(f, OSError(errno.EINVAL, "O_DIRECT is not available"))
                    return None
                try:
                    # O_NONBLOCK: should the path have become a FIFO, do not wait on it.
                    fd = os.open(f.path, os.O_RDONLY | os.O_DIRECT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._refuse_direct(f, err)
                    return None
                st = os.fstat(fd)
                if (st.st_ino, st.st_dev) != (f.ino, f.dev):
                    os.close(fd)
                    raise WeightsError(f"{f.path} was replaced since it was opened; reopen the DiskMap.")
                f.direct_fd = fd
        return f.direct_fd

    def _refuse_direct(self, f: _File, err: OSError) -> None:
        """Fall back to cached reads for ``f``; warn once per DiskMap."""
        f.direct_ok = False
        with self._warn_lock:
            if self._warned_direct:
                return
            self._warned_direct = True
            logger.warning(
                "%s: the filesystem refuses O_DIRECT (%s); reading through the page cache instead.",
                f.path,
                err.strerror or err,
            )

    def _read_direct(self, f: _File, offset: int, nbytes: int, dst: int) -> None:
        """Read ``[offset, offset + nbytes)`` with O_DIRECT via an aligned bounce buffer into ``dst``."""
        assert f.direct_fd is not None
        bounce, bounce_addr = self._bounce()
        end = offset + nbytes
        pos = offset - offset % _DIRECT_ALIGN
        while pos < end:
            want = min(_DIRECT_CHUNK, _round_up(end - pos, _DIRECT_ALIGN))
            got = _preadv(f.direct_fd, bounce[:want], pos)
            lo, hi = max(pos, offset), min(pos + got, end)
            if hi <= lo:
                raise WeightsError(f"{f.path}: unexpected end of file at byte {pos}.")
            # ctypes calls release the GIL, so copies from several threads run in parallel.
            ctypes.memmove(dst + (lo - offset), bounce_addr + (lo - pos), hi - lo)
            if got < want and hi < end:
                raise WeightsError(f"{f.path}: unexpected end of file at byte {pos + got}.")
            pos += got

    def _bounce(self) -> tuple[memoryview, int]:
        """This thread's page-aligned bounce buffer (anonymous mmap) and its address."""
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            region = mmap.mmap(-1, _DIRECT_CHUNK)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
            buf = self._local.bounce = (memoryview(region), addr)
        return buf

    def evict_page_cache(self) -> None:
        """Ask the kernel to drop these files' cached pages, so the next reads come from disk.

        For cold-disk benchmarks; a no-op (with a warning) where ``posix_fadvise`` is missing.

        Examples
        --------
        >>> dm.evict_page_cache()  # doctest: +SKIP
        """
        if not hasattr(os, "posix_fadvise"):
            logger.warning("posix_fadvise is not available here; the page cache is not evicted.")
            return
        for f in self._files:
            os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def cached_fractions(self, keys: "Iterable[str] | None" = None) -> dict[str, float] | None:
        """For each key (all by default), the fraction of its data's pages the page cache holds
        now; None where that cannot be known (not Linux). Reads no data.

        Examples
        --------
        >>> dm.cached_fractions(["w"])  # doctest: +SKIP
        {'w': 1.0}
        """
        from vramfx.storage.page_cache import cached_fraction, cached_pages

        keys = list(self) if keys is None else list(keys)
        pages: dict[int, bytes | None] = {}
        out: dict[str, float] = {}
        for key in keys:
            f, info = self._entries[key]
            if id(f) not in pages:
                pages[id(f)] = cached_pages(f.fd, f.size)
            found = pages[id(f)]
            if found is None:
                return None
            assert info.offset is not None
            out[key] = cached_fraction(found, info.offset, info.nbytes)
        return out

    # -- Using bytes where they lie ----------------------------------------------------------

    def mapped(self, key: str, alignment: int = MAPPED_ALIGNMENT) -> torch.Tensor | None:
        """``key``'s stored bytes as a flat uint8 tensor over a mapping of its file, no copy; None
        when its data does not start at a multiple of ``alignment`` in the file (kernels then see
        another alignment than eager's, and results may differ) or the tensor is empty.

        The file is mapped once, whole, private and copy-on-write (``MAP_PRIVATE``): pages come
        from the page cache when touched and are counted in the process's ``RssFile``, never its
        ``RssAnon``; the kernel may reclaim them and read them again. Nothing writes through
        these views (a write would only copy the page into anonymous memory, never the file).
        The file must not be truncated while mapped: a read past its new end kills the process
        (SIGBUS), as with every mapping; a replaced file keeps its old contents mapped.

        Raises
        ------
        WeightsError
            If the file changed since it was opened.
        ValueError
            If the DiskMap is closed.

        Examples
        --------
        >>> raw = dm.mapped("w")  # doctest: +SKIP
        >>> raw.view(dm.info("w").dtype).view(dm.info("w").shape)  # doctest: +SKIP
        """
        f, info = self._entries[key]
        if self._closed:
            raise ValueError(f"DiskMap is closed; cannot map {key!r}.")
        assert info.offset is not None
        if info.nbytes == 0 or info.offset % alignment:
            return None
        self._check_unchanged(f)
        with f.lock:
            if f.mapping is None:
                # The tensor holds the mapping (a buffer export): it is unmapped once the tensor
                # and every view of it are gone, never under a view still in use.
                m = mmap.mmap(f.fd, f.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                f.mapping = torch.frombuffer(m, dtype=torch.uint8)
        return f.mapping[info.offset : info.offset + info.nbytes]

    def unmap(self) -> None:
        """Let go of the file mappings :meth:`mapped` made: views handed out keep theirs alive, and
        the files are unmapped once those are gone; a later :meth:`mapped` maps them again. For
        callers that mapped the files for a while only (timing nodes on the weights' pages)."""
        for f in self._files:
            with f.lock:
                f.mapping = None

    def check_unchanged(self, keys: "Iterable[str] | None" = None) -> None:
        """Raise :class:`WeightsError` if a file holding ``keys`` (all by default) changed or was
        replaced since it was opened: what every read checks, for users of :meth:`mapped` views,
        which read nothing. Two ``stat`` calls per file."""
        files = {id(f): f for f, _ in (self._entries[k] for k in keys)} if keys is not None else {
            id(f): f for f in self._files}
        for f in files.values():
            self._check_unchanged(f)

    # -- Lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every file; later reads raise. Safe to call twice."""
        self._closed = True
        files, self._files = getattr(self, "_files", []), []
        for f in files:
            f.mapping = None  # views handed out keep the mapping alive; the DiskMap lets go
            for fd in (f.fd, f.direct_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def __enter__(self) -> DiskMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        stamps = [(f.path, f.size, f.mtime_ns) for f in self._files]
        return {"args": self._args, "stamps": stamps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])  # type: ignore[misc]
        now = {f.path: (f.size, f.mtime_ns) for f in self._files}
        for path, size, mtime_ns in state["stamps"]:
            if now.get(path) != (size, mtime_ns):
                self.close()
                raise WeightsError(f"{path} changed since the DiskMap was pickled; reopen it.")


def _rename(name: str, key_map: KeyMap | None) -> str | None:
    """``name`` after ``key_map``."""
    if key_map is None:
        return name
    if isinstance(key_map, Mapping):
        return key_map.get(name, name)
    return key_map(name)


def _round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def _pread_into(fd: int, offset: int, nbytes: int, dst: int, path: str) -> None:
    """``pread`` ``nbytes`` at ``offset`` into the memory at address ``dst``, looping on short reads."""
    view = memoryview((ctypes.c_char * nbytes).from_address(dst)).cast("B")
    done = 0
    while done < nbytes:
        got = _preadv(fd, view[done:], offset + done)
        if got == 0:
            raise WeightsError(f"{path}: unexpected end of file at byte {offset + done}.")
        done += got


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    """``os.preadv`` into one buffer; ``os.pread`` plus a copy where preadv is missing."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
