"""The transfer engine interface: what every runtime (CPU, CUDA) does for a Plan's steps.

An engine owns one plan's arena — a single allocation of ``plan.arena_bytes`` on the compute
device in which every streamed weight has a static, aligned offset, viewed in the dtype it is
stored in — and its upcast region, where each cast of a weight stored in a low dtype has a static
slot in the compute dtype. It serves the graph's ``fetch``/``wait``/``drop``/``resident``/``cast``
calls. Subclasses provide the copying; the bookkeeping, the views and the error handling live here
so every device behaves the same.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from vramfx.errors import VramfxError, WeightsError
from vramfx.plan.plan import Plan, Transfer
from vramfx.weights import WeightRef

log = logging.getLogger(__name__)


def view_bytes(buffer: torch.Tensor, offset: int, ref: WeightRef) -> torch.Tensor:
    """``ref``'s tensor over ``buffer[offset : offset + ref.nbytes]`` (uint8), no copy.

    It requires grad when the model's parameter does (and its stored dtype can), so kernels take
    eager's path (calls run under ``no_grad``: nothing is recorded). A weight with a decoder is
    viewed as the flat run of stored elements its decoder reads.
    """
    raw = buffer[offset : offset + ref.nbytes]
    tensor = raw.view(ref.dtype)
    if getattr(ref, "decoder", None) is not None:
        return tensor
    tensor = tensor.view(ref.shape)
    if not (ref.requires_grad and (tensor.is_floating_point() or tensor.is_complex())):
        return tensor
    # Copies must fill ``buffer``, not this view: an in-place write to it raises outside no_grad.
    return tensor.detach().requires_grad_()


def _compute_views(buffer: torch.Tensor, offset: int, ref: WeightRef) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref``'s tensor in its compute dtype over ``buffer`` from ``offset``, no copy: the view a
    cast writes, and the one the graph reads, which requires grad as :func:`view_bytes`' do."""
    dtype = ref.compute_dtype or ref.dtype
    nbytes = math.prod(ref.shape) * dtype.itemsize
    written = buffer[offset : offset + nbytes].view(dtype).view(ref.shape)
    return written, written.detach().requires_grad_() if ref.requires_grad else written


class ResidentStore:
    """Weights kept on the device across calls, shared by the plans of one compiled module.

    Only the active plan's resident set is held; switching plans frees what the new one does
    not keep, so two cached plans never hold two resident sets at once.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def keep_only(self, names: set[str]) -> None:
        for name in [n for n in self._tensors if n not in names]:
            del self._tensors[name]

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor

    def clear(self) -> None:
        self._tensors.clear()


class Engine(ABC):
    """Runs one Plan's steps on one device.

    Lifecycle: ``activate()`` allocates the arena and loads the resident set; then, per call,
    ``begin_call()``, the graph's steps, and ``end_call()`` — or ``abort()`` when the call
    raised, which drains in-flight copies so the next call starts clean; ``deactivate()`` frees
    the arena.
    """

    def __init__(
        self,
        plan: Plan,
        refs: Mapping[str, WeightRef],
        device: torch.device,
        store: ResidentStore,
    ) -> None:
        self.plan = plan
        self.refs = refs
        self.device = device
        self.store = store
        self._transfers: dict[int, Transfer] = {t.id: t for t in plan.transfers}
        self._arena: torch.Tensor | None = None
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._upcast: torch.Tensor | None = None
        self._cast_views: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
        self._cast_refs = tuple(refs[c.name] for c in plan.casts)
        self._pending: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._arena is not None

    def activate(self) -> None:
        """Allocate the arena and make the resident set present; idempotent.

        If a resident weight cannot be read, an arena allocated by this call is freed again, so
        a failed activation holds nothing until it is retried.
        """
        fresh = self._arena is None
        if fresh:
            self._start_workers()
            self._arena = self._allocate(self.plan.arena_bytes)
            self._views = {
                t.id: tuple(view_bytes(self._arena, off, self.refs[name]) for name, off in zip(t.names, t.offsets))
                for t in self.plan.transfers
            }
            if self.plan.casts:
                self._upcast = self._allocate(self.plan.upcast_bytes)
                self._cast_views = tuple(_compute_views(self._upcast, c.offset, self.refs[c.name]) for c in self.plan.casts)
        keep = set(self.plan.resident)
        self.store.keep_only(keep)
        try:
            for name in self.plan.resident:
                if name not in self.store:
                    self.store.put(name, self._load_resident_named(name))
        except BaseException:
            if fresh:
                self.deactivate()
            raise

    def _load_resident_named(self, name: str) -> torch.Tensor:
        """``_load_resident`` for one weight, an I/O error naming it."""
        try:
            return self._load_resident(self.refs[name])
        except OSError as exc:
            raise WeightsError(f"reading resident weight {name} failed: {exc}") from exc

    def deactivate(self) -> None:
        """Free the arena and stop workers; residents stay in the shared store."""
        self.abort()
        self._views = {}
        self._arena = None
        self._cast_views = ()
        self._upcast = None
        self._stop_workers()

    def begin_call(self) -> None:
        if self._pending:
            self.abort()

    def end_call(self) -> None:
        if self._pending:
            leaked = sorted(self._pending)
            self.abort()
            raise VramfxError(f"transfers {leaked} were fetched but never dropped (a bug in the plan)")

    def abort(self) -> None:
        """Wait out every in-flight copy, ignoring its result, and forget it."""
        try:
            for handle in self._pending.values():
                self._drain(handle)
        finally:
            self._pending.clear()

    # -- steps -----------------------------------------------------------------------------
    def fetch(self, transfer: int) -> None:
        assert transfer not in self._pending, f"transfer {transfer} fetched twice"
        self._pending[transfer] = self._start(self._transfers[transfer], self._views[transfer])

    def wait(self, transfer: int) -> tuple[torch.Tensor, ...]:
        try:
            self._finish(self._pending[transfer])
        except VramfxError:
            raise
        except OSError as exc:
            names = ", ".join(self._transfers[transfer].names)
            raise WeightsError(f"reading weights {names} failed: {exc}") from exc
        return self._views[transfer]

    def drop(self, transfer: int) -> None:
        handle = self._pending.pop(transfer)
        self._release(handle)

    def resident(self, name: str) -> torch.Tensor:
        return self.store[name]

    def cast(self, index: int, stored: torch.Tensor) -> torch.Tensor:
        """``plan.casts[index]``: ``stored`` converted — or decoded, for a weight with a decoder —
        into its slot of the upcast region."""
        written, read = self._cast_views[index]
        self._cast_refs[index].convert_into(stored, written)
        return read

    # -- device specifics ------------------------------------------------------------------
    @abstractmethod
    def _allocate(self, nbytes: int) -> torch.Tensor:
        """One uint8 buffer of ``nbytes`` on the device, aligned to ``plan.alignment`` or better."""

    @abstractmethod
    def _load_resident(self, ref: WeightRef) -> torch.Tensor:
        """Read one weight into its own allocation on the device, synchronously."""

    @abstractmethod
    def _start(self, transfer: Transfer, views: tuple[torch.Tensor, ...]) -> Any:
        """Begin copying ``transfer`` into ``views``; return a handle."""

    @abstractmethod
    def _finish(self, handle: Any) -> None:
        """Block the compute side until the copy behind ``handle`` is usable; re-raise its error."""

    def _release(self, handle: Any) -> None:
        """The compute side is done with the slots behind ``handle``."""

    def _drain(self, handle: Any) -> None:
        """Wait for ``handle``'s copy to stop touching memory, swallowing its error."""
        try:
            self._finish(handle)
        except Exception as exc:  # any error: a copy left pending would re-raise on every later call
            log.debug("discarded failed transfer after abort: %s", exc)

    def _start_workers(self) -> None:
        """Start background workers, if the engine uses any."""

    def _stop_workers(self) -> None:
        """Stop background workers."""
