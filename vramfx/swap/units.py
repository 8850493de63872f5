"""Units: the parameters one wrapped module moves together, and where each of them rests.

A unit's *home* tensors are what the model holds between calls: real tensors (host or device
memory), or meta tensors whose bytes a weights source (a DiskMap) holds. For a call, the unit's
parameters are put in the computation dtype on the computation device and swapped into the
modules that own them; afterwards the home tensors are swapped back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from vramfx.capture import _tensor_aliases
from vramfx.errors import WeightsError
from vramfx.storage.checkpoint_keys import checkpoint_key_map
from vramfx.swap.config import Placement
from vramfx.weights import WeightRef

_LISTED = 10


class Layout(NamedTuple):
    """How a tensor lies in a byte buffer (what :func:`vramfx.runtime.engine.view_bytes` reads)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool  # as the model's parameter, so kernels take eager's path


@dataclass(frozen=True)
class Slot:
    """One parameter of a unit: every place the model holds it, and where its bytes are stored.

    ``places`` are ``(module, name)`` pairs in ``module._parameters`` (a tied parameter has
    several). ``dtype`` is the model's dtype for it. ``ref`` is None when no weights source holds
    it (its home must then be a real tensor). ``requires_grad`` is the parameter's: the tensors
    the op gets have it too, so kernels take eager's path (calls run under ``no_grad``).
    """

    name: str
    places: tuple[tuple[torch.nn.Module, str], ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    ref: WeightRef | None
    requires_grad: bool = False

    def like_parameter(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` requiring grad where the parameter does (a view: copies fill ``tensor``)."""
        if self.requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
            return tensor.detach().requires_grad_()
        return tensor

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel() * dtype.itemsize


class Unit:
    """The parameters of one wrapped module, moved and kept together.

    Each parameter has a *home*, where it rests between calls (a real tensor, or None when its
    bytes are read from the weights source), and a *face*, what the model holds between calls:
    the home itself when it is already on the computation device in the computation dtype,
    else a meta tensor of the computation dtype. Model code that reads a parameter's dtype
    (``model.dtype``, "cast the input to my weight's dtype") so sees the dtype the op runs
    in, not a low-precision storage dtype.

    Parameters
    ----------
    name:
        The module's qualified name in the model, for messages and plans.
    slots:
        Its parameters; their current tensors become the homes (meta ones: read from the source).
    device:
        The computation device.
    compute_dtypes, prepared_dtypes:
        Per slot, the dtype the op runs in and the dtype a kept (resident) copy is held in.
    """

    def __init__(
        self,
        name: str,
        slots: tuple[Slot, ...],
        *,
        device: torch.device,
        compute_dtypes: tuple[torch.dtype, ...],
        prepared_dtypes: tuple[torch.dtype, ...],
    ) -> None:
        self.name = name
        self.slots = slots
        self.device = device
        self.compute_dtypes = compute_dtypes
        self.prepared_dtypes = prepared_dtypes
        self.home: list[torch.Tensor | None] = []
        self.face: list[torch.Tensor] = []
        for i, slot in enumerate(slots):
            current = slot.places[0][0]._parameters[slot.places[0][1]]
            assert current is not None
            self.home.append(None if current.is_meta else current)
            self.face.append(current)
            self._show(i)
        self.index = -1  # its position in the runtime's list of units

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {len(self.slots)} parameters)"

    # -- sizes ---------------------------------------------------------------------------------
    def placed(self, i: int, dtype: torch.dtype) -> bool:
        """Whether slot ``i``'s home is already on the computation device in ``dtype``."""
        home = self.home[i]
        return home is not None and home.device == self.device and home.dtype == dtype

    def copies(self, dtypes: tuple[torch.dtype, ...]) -> tuple[int, ...]:
        """Slots whose home is not already on the device in ``dtypes``: they need a copy."""
        return tuple(i for i in range(len(self.slots)) if not self.placed(i, dtypes[i]))

    def layout(self, dtypes: tuple[torch.dtype, ...], alignment: int) -> tuple[dict[int, tuple[int, Layout]], int]:
        """Offsets of the copied slots in one block, each aligned; and the block's size."""
        offsets: dict[int, tuple[int, Layout]] = {}
        at = 0
        for i in self.copies(dtypes):
            slot = self.slots[i]
            nbytes = slot.nbytes(dtypes[i])
            offsets[i] = (at, Layout(slot.shape, dtypes[i], nbytes, slot.requires_grad))
            at += -(-nbytes // alignment) * alignment
        return offsets, at

    def stream_bytes(self, alignment: int = 1) -> int:
        """Bytes a computation copy takes on the device (the copied slots, in computation dtype)."""
        return self.layout(self.compute_dtypes, alignment)[1]

    def prepared_bytes(self, alignment: int = 1) -> int:
        """Bytes a kept copy takes on the device (the copied slots, in the preparing dtype)."""
        return self.layout(self.prepared_dtypes, alignment)[1]

    def cast_bytes(self) -> int:
        """Bytes of the computation-dtype copies a kept unit makes for each call."""
        return sum(
            self.slots[i].nbytes(self.compute_dtypes[i])
            for i in self.copies(self.compute_dtypes)
            if self.prepared_dtypes[i] != self.compute_dtypes[i]
        )

    def staging_bytes(self) -> int:
        """The largest transient a copy makes: a slot read or moved in its stored dtype, then cast."""
        largest = 0
        for i in self.copies(self.compute_dtypes):
            home, slot = self.home[i], self.slots[i]
            if home is None:
                stored, moved = (slot.ref.dtype if slot.ref is not None else slot.dtype), True
            else:
                stored, moved = home.dtype, home.device != self.device
            if moved and stored != self.compute_dtypes[i]:
                largest = max(largest, slot.nbytes(stored))
        return largest

    # -- the model's view ----------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self, tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """Put ``tensors`` where the model holds this unit's parameters, then the faces back."""
        for slot, t in zip(self.slots, tensors):
            for module, local in slot.places:
                module._parameters[local] = t
        try:
            yield
        finally:
            for slot, t in zip(self.slots, self.face):
                for module, local in slot.places:
                    module._parameters[local] = t

    def call_with(self, tensors: tuple[torch.Tensor, ...], fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``fn(*args, **kwargs)`` with ``tensors`` swapped in for this unit's parameters."""
        with self.swapped(tensors):
            return fn(*args, **kwargs)

    def set_home(self, i: int, tensor: torch.Tensor | None) -> None:
        """Make ``tensor`` (None: the weights source) slot ``i``'s home."""
        if tensor is not None and not isinstance(tensor, torch.nn.Parameter):
            grad = self.slots[i].requires_grad and tensor.is_floating_point()
            tensor = torch.nn.Parameter(tensor, requires_grad=grad)
        self.home[i] = tensor
        self._show(i)

    def _show(self, i: int) -> None:
        """Give the model slot ``i``'s face: the home when usable as is, else a meta stand-in."""
        slot, old, dtype = self.slots[i], self.face[i], self.compute_dtypes[i]
        if self.placed(i, dtype):
            face = self.home[i]
        elif old.is_meta and old.dtype == dtype:
            face = old
        else:
            meta = torch.empty(slot.shape, dtype=dtype, device="meta")
            face = torch.nn.Parameter(meta, requires_grad=slot.requires_grad and meta.is_floating_point())
        assert face is not None
        self.face[i] = face
        for module, local in slot.places:
            module._parameters[local] = face


@torch.no_grad()
def fill(
    out: torch.Tensor,
    home: torch.Tensor | None,
    ref: WeightRef | None,
    *,
    bypass_page_cache: bool = False,
    non_blocking: bool = False,
) -> None:
    """Copy one parameter into ``out`` (any dtype, on the computation device) from its home.

    With no home it is read from ``ref``: straight into ``out`` when that is host memory of the
    stored dtype, else through a staging buffer (pinned for CUDA) and cast where it lands.
    """
    out = out.detach()  # a view that requires grad is written through its detached twin
    if home is not None:
        out.copy_(home, non_blocking=non_blocking)
        return
    assert ref is not None, "a parameter without a home or stored bytes passed the unit checks"
    if out.device.type == "cpu" and out.dtype == ref.dtype and out.is_contiguous():
        ref.read_into(out.reshape(-1).view(torch.uint8), bypass_page_cache=bypass_page_cache)
        return
    # A pinned staging buffer must outlive a non-blocking copy: the caller synchronises.
    staging = torch.empty(ref.nbytes, dtype=torch.uint8, pin_memory=out.device.type == "cuda")
    ref.read_into(staging, bypass_page_cache=bypass_page_cache)
    out.copy_(staging.view(ref.dtype).view(ref.shape), non_blocking=non_blocking)


@torch.no_grad()
def read_tensor(ref: WeightRef, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor on ``device`` in ``dtype`` holding ``ref``'s stored values."""
    out = torch.empty(ref.shape, dtype=dtype, device=device)
    fill(out, None, ref)
    return out


class UnitBuilder:
    """Builds the units of one model: finds each parameter's stored bytes and checks them.

    A parameter is found in ``source`` under its own name, any tied twin's name, or the
    checkpoint name transformers would load it from. Problems are collected, not raised one at a
    time, so :meth:`raise_problems` lists them all before anything is changed.
    """

    def __init__(self, model: torch.nn.Module, source: object | None) -> None:
        self.source = source
        self.aliases = _aliases(model)
        self.renamed = checkpoint_key_map(model, source) if isinstance(source, Mapping) else {}
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def ref(self, name: str, shape: tuple[int, ...], *, required: bool) -> WeightRef | None:
        """``name``'s stored bytes, or None; a missing one is a problem when ``required``."""
        source = self.source
        names = self.aliases.get(name, (name,))
        candidates = [*names, *(self.renamed[n] for n in names if n in self.renamed)]
        key = next((k for k in candidates if source is not None and k in source), None)
        if key is None:
            if required:
                self.missing.append(name)
            return None
        info = source.info(key)  # type: ignore[union-attr]
        if tuple(info.shape) != tuple(shape):
            self.mismatched.append(f"{key}: stored {tuple(info.shape)}, model expects {tuple(shape)}")
            return None
        return WeightRef(name, source, key, tuple(shape), info.dtype, info.nbytes)  # type: ignore[arg-type]

    def slots(self, root: torch.nn.Module, prefix: str, *, recursive: bool, required: bool) -> tuple[Slot, ...]:
        """The parameters of ``root`` (and of its submodules when ``recursive``), ties merged."""
        by_tensor: dict[int, tuple[str, list[tuple[torch.nn.Module, str]], torch.Tensor]] = {}
        modules = root.named_modules(prefix=prefix, remove_duplicate=False) if recursive else [(prefix, root)]
        for module_name, module in modules:
            for local, param in module._parameters.items():
                if param is None:
                    continue
                name = f"{module_name}.{local}" if module_name else local
                entry = by_tensor.setdefault(id(param), (name, [], param))
                entry[1].append((module, local))
        return tuple(
            Slot(
                name,
                tuple(places),
                tuple(param.shape),
                param.dtype,
                self.ref(name, tuple(param.shape), required=True) if required or param.is_meta else None,
                param.requires_grad,
            )
            for name, places, param in by_tensor.values()
        )

    def raise_problems(self, what: str) -> None:
        """Raise one WeightsError listing every missing and mismatched parameter so far."""
        lines = []
        if self.missing:
            lines.append(
                f"{len(self.missing)} parameter(s) of {what} have no stored weight: {_listed(self.missing)}. "
                "Pass disk_map/weights holding them (check key names)."
            )
        if self.mismatched:
            lines.append(
                f"{len(self.mismatched)} stored weight(s) differ in shape from the model: "
                f"{_listed(self.mismatched)}. Build the model with the checkpoint's config."
            )
        if lines:
            raise WeightsError(" ".join(lines))


def _aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every state-dict name of each parameter and buffer, by each of its names."""
    groups = _tensor_aliases(model).values()
    return {name: (name, *(n for n in names if n != name)) for names in groups for name in names}


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", … ({len(items)} in all)" if len(items) > _LISTED else "")


@torch.no_grad()
def move_home(unit: Unit, placement: Placement) -> None:
    """Move ``unit``'s homes to ``placement``: the disk map (no tensor), or real tensors there."""
    for i, slot in enumerate(unit.slots):
        home = unit.home[i]
        if placement.on_disk:
            assert slot.ref is not None, "a unit placed on disk has every weight in the disk map"
            if home is not None:
                unit.set_home(i, None)
            continue
        assert placement.device is not None
        dtype = placement.dtype_for(slot.dtype)
        if home is None:
            assert slot.ref is not None, "a parameter without a home or stored bytes passed the unit checks"
            unit.set_home(i, read_tensor(slot.ref, placement.device, dtype))
        elif home.device != placement.device or home.dtype != dtype:
            unit.set_home(i, home.detach().to(placement.device, dtype))


@dataclass(frozen=True)
class LooseTensor:
    """A parameter or buffer no unit moves: it is put on the computation device once, and stays."""

    owner: torch.nn.Module
    local: str
    kind: str  # "parameter" or "buffer"
    name: str
    ref: WeightRef | None

    @property
    def store(self) -> dict[str, torch.Tensor]:
        return self.owner._parameters if self.kind == "parameter" else self.owner._buffers

    def placed_on(self, device: torch.device) -> bool:
        """Whether the tensor is already real on ``device``."""
        tensor = self.store[self.local]
        return not tensor.is_meta and tensor.device == device


def loose_tensors(
    model: torch.nn.Module, builder: UnitBuilder, covered: set[int]
) -> list[LooseTensor]:
    """Every buffer, and the parameters of modules not in ``covered`` (ids of modules units move).

    Meta ones must be in the weights source; a missing one is recorded in ``builder``.
    """
    out = []
    for module_name, module in model.named_modules():
        stores = [("buffer", module._buffers)]
        if id(module) not in covered:
            stores.append(("parameter", module._parameters))
        for kind, store in stores:
            for local, t in store.items():
                if t is None:
                    continue
                name = f"{module_name}.{local}" if module_name else local
                ref = builder.ref(name, tuple(t.shape), required=True) if t.is_meta else None
                out.append(LooseTensor(module, local, kind, name, ref))
    return out


@torch.no_grad()
def materialise(
    loose: list[LooseTensor], device: torch.device, parameter_dtype: Placement
) -> int:
    """Put ``loose`` tensors on ``device`` (parameters in ``parameter_dtype``'s dtype); bytes allocated."""
    allocated = 0
    for t in loose:
        store = t.store
        current = store[t.local]
        dtype = parameter_dtype.dtype_for(current.dtype) if t.kind == "parameter" else current.dtype
        if current.is_meta:
            assert t.ref is not None, "a meta tensor without stored bytes passed the checks"
            new = read_tensor(t.ref, device, dtype)
        elif current.device != device or current.dtype != dtype:
            new = current.detach().to(device, dtype)
        else:
            continue
        allocated += new.numel() * new.element_size()
        if t.kind == "parameter":
            new = torch.nn.Parameter(new, requires_grad=current.requires_grad and new.is_floating_point())
        store[t.local] = new
    return allocated
