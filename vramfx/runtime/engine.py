"""The transfer engine interface: what every runtime (CPU, CUDA) does for a Plan's steps.

An engine owns one plan's arena — a single allocation of ``plan.arena_bytes`` on the compute
device in which every streamed weight has a static, aligned offset, viewed in the dtype it is
stored in — and its upcast region, where each cast of a weight stored in a low dtype has a static
slot in the compute dtype. It serves the ``fetch``/``wait``/``drop``/``resident``/``cast`` steps of
both front ends: a compiled graph's nodes, and the module front end (layer swap) at each module's
position in its recorded order. Weights a front end needs off the plan (a module called out of
the recorded order, the call that records it) are loaded by :meth:`Engine.load_now` into free
arena bytes, first fit, or into memory of their own when the arena has no room. A kept weight whose
decoder asks for it (a fused LoRA on the layer-swap path) is decoded once as it is made resident,
in its own bytes, and its casts read that. Subclasses provide
the copying; the bookkeeping, the views and the error handling live here so every device behaves
the same.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vramfx.errors import VramfxError, WeightsError
from vramfx.forks import renew_after_fork
from vramfx.plan.plan import Plan, Transfer
from vramfx.progress import step
from vramfx.runtime.arena import reserved_ranges
from vramfx.runtime.sources import mapped_bytes, on_device
from vramfx.storage.ref import WeightRef
from vramfx.util import FreeList, align_up

log = logging.getLogger(__name__)


def view_bytes(buffer: torch.Tensor, offset: int, ref: WeightRef) -> torch.Tensor:
    """``ref``'s tensor over ``buffer[offset : offset + ref.nbytes]`` (uint8), no copy.

    It requires grad when the model's parameter does (and its stored dtype can), so kernels take
    eager's path (calls run under ``no_grad``: nothing is recorded). A weight with a decoder is
    viewed as the flat run of stored elements its decoder reads.
    """
    raw = buffer[offset : offset + ref.nbytes]
    tensor = raw.view(ref.dtype)
    if ref.decoder is not None:
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


def decoded_when_kept(ref: WeightRef) -> bool:
    """Whether a kept copy of ``ref`` holds its decoded values (decoded once, when it is made
    resident, into its own bytes) instead of its stored bytes decoded at every cast: a decoder
    that asks for it (``kept_decoded``) and whose values have the stored dtype, so they take the
    same bytes. Whoever changes what the decoder reads drops the kept copy."""
    decoder = ref.decoder
    return bool(getattr(decoder, "kept_decoded", False)) and ref.compute_dtype in (None, ref.dtype)


def _read_view(decoded: torch.Tensor, ref: WeightRef) -> torch.Tensor:
    """What the op reads of a weight kept decoded: it requires grad as :func:`view_bytes`' views do."""
    return decoded.detach().requires_grad_() if ref.requires_grad else decoded


@dataclass
class Loaded:
    """Weights :meth:`Engine.load_now` copied off the plan, until :meth:`Engine.unload`.

    ``tensors`` are what the op reads, one per name asked for (cast to its compute dtype where it
    has one). They view ``block`` = ``(offset, nbytes)`` of the arena, or ``own``, memory of their
    own when the arena had no room.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    nbytes: int
    stored_bytes: int
    block: tuple[int, int] | None = None
    own: torch.Tensor | None = None
    cast_bytes: int = 0


def layout(
    refs: Sequence[WeightRef], alignment: int, copied: Sequence[bool] | None = None
) -> tuple[list[int], list[int], int]:
    """Offsets in one block of each copied weight's stored bytes, then of each cast's compute-dtype
    bytes (``-1`` where there is none), every offset aligned; and the block's size. ``copied``
    says which weights need their stored bytes copied (all by default)."""
    stored, cast, at = [], [], 0
    for k, ref in enumerate(refs):
        if copied is None or copied[k]:
            stored.append(at)
            at += align_up(ref.nbytes, alignment)
        else:
            stored.append(-1)
    for ref in refs:
        if ref.casts:
            cast.append(at)
            at += align_up(math.prod(ref.shape) * (ref.compute_dtype or ref.dtype).itemsize, alignment)
        else:
            cast.append(-1)
    return stored, cast, at


def single_threaded_after_fork() -> None:
    """In a forked child, run torch's CPU ops on one thread when its thread pool is OpenMP's.

    GNU OpenMP's pool does not survive ``fork``: a child's first parallel op waits forever on
    threads that only the parent has (eager too). torch's DataLoader workers run on one thread
    for the same reason; so does a child that uses a vramfx model.
    """
    if torch.get_num_threads() > 1 and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)
        log.info("vramfx: forked child: torch's OpenMP thread pool does not survive fork; running on one thread")


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

    def drop(self, name: str) -> None:
        self._tensors.pop(name, None)

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
        # Kept decoded: read into memory of their own (not used where they lie, on the device or mapped).
        self._kept_decoded = frozenset(
            n for n in plan.resident
            if n not in plan.in_place and decoded_when_kept(refs[n]) and on_device(refs[n], device) is None
        )
        self._in_place = frozenset(plan.in_place)
        self._mapped_files: dict[int, tuple[Any, list[str]]] = {}  # id(source): (source, keys)
        for name in plan.in_place:
            self._mapped_files.setdefault(id(refs[name].source), (refs[name].source, []))[1].append(refs[name].key)
        self._pending: dict[int, Any] = {}
        self._waited: set[int] = set()  # pending transfers whose copy has been waited for
        self._loaded: list[Loaded] = []  # loads off the plan not yet unloaded
        self._active = False
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the copies in flight were the parent's and its workers are gone;
        forget both (workers start again on first use). Residents and the arena were copied."""
        self._pending.clear()
        self._waited.clear()
        self._forget_workers()
        single_threaded_after_fork()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    @property
    def pending(self) -> tuple[int, ...]:
        """Transfers fetched and not yet dropped."""
        return tuple(self._pending)

    def activate(self) -> None:
        """Allocate the arena and make the resident set present; idempotent.

        If a resident weight cannot be read, an arena allocated by this call is freed again, so
        a failed activation holds nothing until it is retried.
        """
        fresh = not self._active
        if fresh:
            self._start_workers()
            if self.plan.casts:
                self._upcast = self._allocate(self.plan.upcast_bytes)
                self._cast_views = tuple(_compute_views(self._upcast, c.offset, self.refs[c.name]) for c in self.plan.casts)
            self._active = True
        if self._arena is None:
            self._arena = self._allocate(self.plan.arena_bytes)
            self._views = {
                t.id: tuple(view_bytes(self._arena, off, self.refs[name]) for name, off in zip(t.names, t.offsets))
                for t in self.plan.transfers
            }
        keep = set(self.plan.resident)
        self.store.keep_only(keep)
        try:
            missing = [name for name in self.plan.resident if name not in self.store]
            if missing:
                with step("loading resident weights", total=len(missing)) as advance:
                    for name in missing:
                        self.store.put(name, self._load_resident_named(name))
                        advance()
        except BaseException:
            if fresh:
                self.deactivate()
            raise

    def _load_resident_named(self, name: str) -> torch.Tensor:
        """``_load_resident`` for one weight, an I/O error naming it; a weight already on the device
        is used where it lies."""
        ref = self.refs[name]
        there = on_device(ref, self.device)
        if there is not None:
            return view_bytes(there.reshape(-1).view(torch.uint8), 0, ref)
        if name in self._in_place:
            try:
                mapped = mapped_bytes(ref)
            except OSError as exc:
                raise WeightsError(f"mapping weight {name} failed: {exc}") from exc
            if mapped is None:
                raise WeightsError(f"weight {name} was planned to be used in place from its file, which it no "
                                   "longer can be; reopen the weights and compile again")
            return view_bytes(mapped, 0, ref)
        try:
            stored = self._load_resident(ref)
        except OSError as exc:
            raise WeightsError(f"reading resident weight {name} failed: {exc}") from exc
        if name in self._kept_decoded:
            decoded = stored.view(ref.shape)
            ref.convert_into(stored, decoded)  # in place: the values keep the stored bytes' dtype and layout
            return decoded
        return stored

    def deactivate(self) -> None:
        """Free the arena and stop workers; residents stay in the shared store."""
        self.abort()
        self._loaded.clear()
        self._views = {}
        self._arena = None
        self._cast_views = ()
        self._upcast = None
        self._active = False
        self._stop_workers()

    def release_arena(self) -> bool:
        """Free the arena while nothing is in it (no transfer pending, no load in it), so a load off
        the plan that does not fit can have its memory; the next :meth:`activate` allocates it
        again. False, freeing nothing, when something is in it."""
        if self._arena is None or self._pending or any(x.block is not None for x in self._loaded):
            return False
        self._arena, self._views = None, {}
        return True

    def begin_call(self) -> None:
        if self._pending:
            self.abort()
        # Weights used in place read no bytes, so nothing else notices their file changing.
        for source, keys in self._mapped_files.values():
            source.check_unchanged(keys)

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
            self._waited.clear()

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
        self._waited.add(transfer)
        return self._views[transfer]

    def drop(self, transfer: int) -> None:
        handle = self._pending.pop(transfer)
        if transfer not in self._waited:  # fetched and never read: its copy must stop writing first
            self._drain(handle)
        self._waited.discard(transfer)
        self._release(handle)

    def resident(self, name: str) -> torch.Tensor:
        return self.store[name]

    def cast(self, index: int, stored: torch.Tensor) -> torch.Tensor:
        """``plan.casts[index]``: ``stored`` converted — or decoded, for a weight with a decoder —
        into its slot of the upcast region."""
        ref = self._cast_refs[index]
        if ref.name in self._kept_decoded and ref.name in self.store:
            return _read_view(self.store[ref.name], ref)  # decoded once, when it was made resident
        written, read = self._cast_views[index]
        ref.convert_into(stored, written)
        return read

    # -- what it holds ----------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Device bytes held now, as the plan counts them: the arena, the upcast region, the plan's
        resident weights present, and loads off the plan in memory of their own."""
        if not self.active:
            return 0
        planned = self.plan.name_to_weight
        resident = sum(align_up(planned[n].nbytes, self.plan.alignment) for n in self.plan.resident if n in self.store)
        own = sum(loaded.nbytes for loaded in self._loaded if loaded.own is not None)
        arena = self.plan.arena_bytes if self._arena is not None else 0
        return arena + self.plan.upcast_bytes + resident + own

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` views memory this engine reuses: the arena, the upcast region, or a load's."""
        buffers = [self._arena, self._upcast, *(loaded.own for loaded in self._loaded)]
        address = tensor.untyped_storage().data_ptr()
        return any(b is not None and b.untyped_storage().data_ptr() == address for b in buffers)

    # -- loads off the plan -----------------------------------------------------------------
    def load_bytes(self, names: Sequence[str]) -> int:
        """Device bytes :meth:`load_now` of ``names`` takes: stored bytes and casts, aligned."""
        refs = [self.refs[n] for n in names]
        return layout(refs, self.plan.alignment, [self._present(r) is None for r in refs])[2]

    def _present(self, ref: WeightRef) -> torch.Tensor | None:
        """``ref``'s stored bytes where they already are on the device: resident, or where they lie."""
        if ref.name in self.store:
            return self.store[ref.name]
        return on_device(ref, self.device)

    def load_now(self, names: Sequence[str], *, own_memory: bool = True) -> Loaded | None:
        """Copy ``names`` to the device now, off the plan; cast those with a compute dtype.

        The block goes into arena bytes that no transfer in flight or in use and no other load
        holds (first fit), else — when ``own_memory`` — into memory of its own; None when it may
        not. Nothing the plan's steps hold is touched. A weight already on the device (resident,
        or kept there by the model) is read where it lies: only its cast takes room.
        """
        assert self.active, "engine used before activate()"
        refs = [self.refs[n] for n in names]
        there = [self._present(r) for r in refs]
        stored, cast, size = layout(refs, self.plan.alignment, [t is None for t in there])
        offset = self._free_arena_bytes().allocate(size) if size else None
        own = None
        if offset is None:
            if not own_memory:
                return None
            own = self._allocate(size)
            buffer, offset = own, 0
        else:
            buffer = self._arena
        copies = [(ref, offset + at) for ref, at, t in zip(refs, stored, there) if t is None]
        block = None if own is not None else (offset, size)
        loaded = Loaded(tuple(names), (), size, sum(r.nbytes for r, _ in copies), block, own)
        try:
            self._copy_now(buffer, copies)
        except OSError as exc:
            raise WeightsError(f"reading weights {', '.join(names)} failed: {exc}") from exc
        loaded.cast_bytes = sum(
            math.prod(r.shape) * (r.compute_dtype or r.dtype).itemsize for r, c in zip(refs, cast) if c >= 0
        )
        tensors = []
        for ref, at, cast_at, t in zip(refs, stored, cast, there):
            if t is not None and ref.name in self._kept_decoded and ref.name in self.store:
                tensors.append(_read_view(t, ref))  # kept decoded: no cast
                continue
            there_bytes = buffer if t is None else t.detach().reshape(-1).view(torch.uint8)
            source = view_bytes(there_bytes, offset + at if t is None else 0, ref)
            if cast_at >= 0:
                written, view = _compute_views(buffer, offset + cast_at, ref)
                ref.convert_into(source.detach(), written)
                source = view
            tensors.append(source)
        loaded.tensors = tuple(tensors)
        self._loaded.append(loaded)
        return loaded

    def unload(self, loaded: Loaded) -> None:
        """The op is done with a load: its block may be reused once the compute side has passed here."""
        self._loaded = [x for x in self._loaded if x is not loaded]
        self._fence()

    def _free_arena_bytes(self) -> FreeList:
        """The arena bytes no transfer in flight or in use and no load holds."""
        plan = self.plan
        free = FreeList(plan.arena_bytes if self._arena is not None else 0)
        taken = [r for t in self._pending for r in reserved_ranges(self._transfers[t], plan.alignment, plan.arena_bytes)]
        taken += [(o, o + n) for o, n in (x.block for x in self._loaded if x.block is not None)]
        for start, end in sorted(taken):
            free.reserve(start, end - start)
        return free

    # -- device specifics ------------------------------------------------------------------
    @abstractmethod
    def _copy_now(self, buffer: torch.Tensor, members: Sequence[tuple[WeightRef, int]]) -> None:
        """Copy each ``(ref, offset)`` into ``buffer`` at ``offset``; the compute side may read them
        once this returns."""

    def _fence(self) -> None:
        """Copies started from here on must not overwrite what the compute side has not read yet."""

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

    def _forget_workers(self) -> None:
        """Drop background workers without joining them: in a forked child they do not exist."""
