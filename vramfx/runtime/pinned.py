"""Host weights page-locked where they lie, so the copy engine reads them with no extra copy.

Other tools pin by copying weights into fresh pinned memory, which holds the model twice in RAM.
Here the memory the weights already occupy is registered with the driver instead, in chunks of
at most ``chunk_bytes``: never a second copy, and a failure (a memlock limit, a read-only
mapping) costs only the chunks it hits, which then go through the pinned staging ring, with one
warning.

Only whole pages inside a weight are registered: a page shared with a neighbour would be
registered twice, which the driver refuses. The partial pages at either end are staged.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Mapping
from typing import Protocol

import torch

from vramfx.runtime.chunks import Segment, whole
from vramfx.util import format_bytes

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
#: The most bytes one registration covers; a failure loses at most this much pinning.
PIN_CHUNK_BYTES = 256 * 2**20
#: Weights with fewer whole pages than this are staged: a registration per tiny weight costs
#: more than copying it.
MIN_PIN_BYTES = 2**20


class HostPinner(Protocol):
    """Registers host memory with the device driver."""

    def register(self, address: int, nbytes: int) -> None:
        """Page-lock ``[address, address + nbytes)``; raise ``RuntimeError`` on failure."""

    def unregister(self, address: int) -> None:
        """Undo :meth:`register` of the range starting at ``address``."""

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is page-locked already (by whoever allocated it)."""


#: ``cudaHostRegisterPortable``: pinned for every CUDA context, whichever device the registering
#: thread has current.
_PORTABLE = 1


class CudaHostPinner:
    """:class:`HostPinner` through ``cudaHostRegister``."""

    def register(self, address: int, nbytes: int) -> None:
        code = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _PORTABLE))
        if code:
            raise RuntimeError(f"cudaHostRegister failed with cudaError {code}")

    def unregister(self, address: int) -> None:
        code = int(torch.cuda.cudart().cudaHostUnregister(address))
        if code:
            raise RuntimeError(f"cudaHostUnregister failed with cudaError {code}")

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()


class PinRegistry:
    """Reference counts of registered ranges, so engines over the same host weights share them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}

    def acquire(self, pinner: HostPinner, address: int, nbytes: int) -> None:
        with self._lock:
            key = (address, nbytes)
            if key not in self._counts:
                pinner.register(address, nbytes)
            self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, pinner: HostPinner, address: int, nbytes: int) -> None:
        with self._lock:
            key = (address, nbytes)
            self._counts[key] -= 1
            if self._counts[key] == 0:
                del self._counts[key]
                pinner.unregister(address)

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any registration here touches ``[start, end)``."""
        with self._lock:
            return any(a < end and start < a + n for a, n in self._counts)

    def __len__(self) -> int:
        return len(self._counts)


#: The process's registrations: the driver's page-lock table is per process too.
REGISTRY = PinRegistry()


class PinnedHostMemory:
    """The host weights one engine streams, page-locked in place, chunk by chunk.

    Parameters
    ----------
    pinner:
        How to register memory (:class:`CudaHostPinner` on CUDA).
    chunk_bytes:
        The most bytes one registration covers (a multiple of the page size).
    min_bytes:
        Weights with fewer whole pages than this stay unpinned and are staged.
    registry:
        Shared reference counts of registrations.

    Examples
    --------
    >>> memory = PinnedHostMemory(CudaHostPinner())  # doctest: +SKIP
    >>> memory.pin({"w": weight.reshape(-1).view(torch.uint8)})  # doctest: +SKIP
    >>> memory.segments("w", weight.nbytes)  # doctest: +SKIP
    (Segment(start=0, nbytes=64, pinned=False), Segment(start=64, nbytes=..., pinned=True), ...)
    """

    def __init__(
        self,
        pinner: HostPinner,
        *,
        chunk_bytes: int = PIN_CHUNK_BYTES,
        min_bytes: int = MIN_PIN_BYTES,
        page_bytes: int = PAGE_BYTES,
        registry: PinRegistry = REGISTRY,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % page_bytes:
            raise ValueError(f"chunk_bytes must be a positive multiple of {page_bytes}, got {chunk_bytes}")
        self.pinner = pinner
        self.chunk_bytes = chunk_bytes
        self.min_bytes = min_bytes
        self.page_bytes = page_bytes
        self.registry = registry
        self._segments: dict[str, tuple[Segment, ...]] = {}
        self._held: list[tuple[torch.Tensor, int, int]] = []  # (tensor kept alive, address, nbytes)
        self._warned = False

    @property
    def pinned_bytes(self) -> int:
        """Bytes this store has page-locked (not counting memory that came pinned)."""
        return sum(n for _, _, n in self._held)

    def segments(self, name: str, nbytes: int) -> tuple[Segment, ...]:
        """How weight ``name``'s bytes are held: pinned stretches and staged ones, in order."""
        return self._segments.get(name) or whole(nbytes)

    def pin(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Page-lock the whole pages of each flat uint8 CPU tensor, where it lies.

        A tensor whose memory is pinned already is used as it is. Failures are logged once
        and leave the bytes they hit to be staged.
        """
        errors: list[BaseException] = []
        failed = [0]
        # A failed driver call leaves an error behind in its host thread, which the next kernel
        # launch in that thread would report as its own; registering from a thread of our own
        # keeps it there.
        worker = threading.Thread(
            target=self._pin_all, args=(tensors, failed, errors), name="vramfx-pin", daemon=True
        )
        worker.start()
        worker.join()
        unexpected = [e for e in errors if not isinstance(e, (RuntimeError, OSError))]
        if unexpected:
            raise unexpected[0]
        if errors and not self._warned:
            self._warned = True
            total = sum(t.numel() for t in tensors.values())
            log.warning(
                "vramfx: could not page-lock %s of %s of host weights in place (%s); those bytes "
                "are copied through the pinned staging ring instead, which costs a host copy. "
                "Raising the locked-memory limit (ulimit -l) usually fixes this.",
                format_bytes(failed[0]),
                format_bytes(total),
                errors[0],
            )

    def release(self) -> None:
        """Unregister everything; call only once no copy reads these weights any more."""
        held, self._held = self._held, []
        self._segments = {}
        errors: list[BaseException] = []

        def unpin() -> None:
            for _tensor, address, nbytes in held:
                try:
                    self.registry.release(self.pinner, address, nbytes)
                except (RuntimeError, OSError) as exc:
                    errors.append(exc)

        worker = threading.Thread(target=unpin, name="vramfx-unpin", daemon=True)
        worker.start()
        worker.join()
        if errors:
            log.warning("vramfx: unregistering pinned host weights failed: %s", errors[0])

    def _pin_all(self, tensors: Mapping[str, torch.Tensor], failed: list[int], errors: list[BaseException]) -> None:
        """Register every tensor's chunks, recording failures instead of raising them."""
        try:
            for name, flat in tensors.items():
                assert flat.dtype == torch.uint8 and flat.dim() == 1 and flat.is_contiguous()
                address = flat.data_ptr()
                # Memory we registered also reads as pinned, but only its whole pages are.
                ours = self.registry.overlaps(address, address + flat.numel())
                if flat.numel() and not ours and self.pinner.is_pinned(flat):
                    self._segments[name] = (Segment(0, flat.numel(), True),)
                    continue
                self._segments[name] = self._pin_one(flat, failed, errors)
        except BaseException as exc:  # re-raised by pin() in the caller's thread
            errors.append(exc)

    def _pin_one(self, flat: torch.Tensor, failed: list[int], errors: list[BaseException]) -> tuple[Segment, ...]:
        """Register one tensor's whole pages in chunks; its segments."""
        address, nbytes = flat.data_ptr(), flat.numel()
        first = -(-address // self.page_bytes) * self.page_bytes
        last = (address + nbytes) // self.page_bytes * self.page_bytes
        if last - first < max(self.min_bytes, self.page_bytes):
            return whole(nbytes)
        segments: list[Segment] = []

        def add(start: int, size: int, pinned: bool) -> None:
            if segments and not pinned and not segments[-1].pinned:
                prev = segments.pop()
                segments.append(Segment(prev.start, prev.nbytes + size, False))
            elif size:
                segments.append(Segment(start, size, pinned))

        add(0, first - address, False)
        at = first
        while at < last:
            # Chunks end at multiples of chunk_bytes, so two engines cut a weight the same way.
            stop = min((at // self.chunk_bytes + 1) * self.chunk_bytes, last)
            try:
                self.registry.acquire(self.pinner, at, stop - at)
            except (RuntimeError, OSError) as exc:
                errors.append(exc)
                failed[0] += stop - at
                add(at - address, stop - at, False)
            else:
                self._held.append((flat, at, stop - at))
                add(at - address, stop - at, True)
            at = stop
        add(last - address, address + nbytes - last, False)
        return tuple(segments)
