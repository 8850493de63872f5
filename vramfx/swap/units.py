"""Units: the parameters one wrapped module moves together, and where each of them rests.

A unit's *home* tensors are what the model holds between calls: real tensors (host or device
memory), or nothing when the weights source (a DiskMap) holds the bytes. For a call, the engine
puts each parameter on the computation device in the computation dtype and the unit swaps it into
the modules that own it; afterwards the model's stand-ins (*faces*) are swapped back.

Each floating-point parameter has three dtypes:

- *stored*: what its values rest in (the home's dtype; on disk, the offload dtype, or the file's
  own when that converts into it exactly). It decides the values the op sees:
  ``w.to(stored).to(compute)``, whatever is kept or streamed;
- *held*: what it is moved and held in on the device, kept or streamed — the stored dtype when
  it is narrower than the compute dtype (cast up there, per call), else the compute dtype
  (narrowed as it is read);
- *compute*: what the op reads.

Integer tensors keep their own dtype in every state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.precision import exactly_widens
from vramfx.storage.checkpoint_keys import checkpoint_key_map, tensor_aliases
from vramfx.storage.converted import read_stored
from vramfx.storage.ref import WeightRef
from vramfx.swap.config import Placement
from vramfx.weights import decoder_of, find_key

_LISTED = 10


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


class Unit:
    """The parameters of one wrapped module, moved and kept together.

    Each parameter has a *home*, where it rests between calls (a real tensor, or None when its
    bytes are read from the weights source), and a *face*, what the model holds between calls:
    the home itself when it is already on the computation device in the computation dtype,
    else a meta tensor of the computation dtype. Model code that reads a parameter's dtype
    (``model.dtype``, "cast the input to my weight's dtype") so sees the dtype the op runs in.

    Parameters
    ----------
    name:
        The module's qualified name in the model, for messages and plans.
    slots:
        Its parameters; their current tensors become the homes (meta ones: read from the source).
    device:
        The computation device.
    compute_dtypes:
        Per slot, the dtype the op runs in.
    """

    def __init__(
        self,
        name: str,
        slots: tuple[Slot, ...],
        *,
        device: torch.device,
        compute_dtypes: tuple[torch.dtype, ...],
    ) -> None:
        self.name = name
        self.slots = slots
        self.device = device
        self.compute_dtypes = compute_dtypes
        self.home: list[torch.Tensor | None] = []
        self.face: list[torch.Tensor] = []
        # Per parameter, what LoRA merges into it are recorded against (vramfx.adapters.fusions): the
        # model's own meta parameter (merges recorded before the unit existed are on it), else a
        # meta stand-in made for it; a tensor that never changes and holds no memory.
        self.anchors: list[torch.Tensor] = []
        # The dtype each parameter's values take when read from the weights source.
        self.disk_dtypes = [slot.ref.dtype if slot.ref is not None else slot.dtype for slot in slots]
        for i, slot in enumerate(slots):
            current = slot.places[0][0]._parameters[slot.places[0][1]]
            assert current is not None
            self.home.append(None if current.is_meta else current)
            self.face.append(current)
            stand_in = current if current.is_meta else torch.empty(slot.shape, dtype=slot.dtype, device="meta")
            self.anchors.append(stand_in)
            self._show(i)
        self.index = -1  # its position in the runtime's list of units

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {len(self.slots)} parameters)"

    def stored_dtype(self, i: int) -> torch.dtype:
        """The dtype slot ``i``'s values rest in."""
        home = self.home[i]
        return home.dtype if home is not None else self.disk_dtypes[i]

    def decoded(self, i: int) -> bool:
        """Whether slot ``i`` rests as a run its decoder turns into values (GGUF, scaled fp8): moved
        and held as stored whatever the placement's dtype, decoded on the device per call."""
        ref = self.slots[i].ref
        return ref is not None and ref.decoder is not None

    def held_dtype(self, i: int) -> torch.dtype:
        """The dtype slot ``i`` is moved and held in on the device."""
        if self.decoded(i):
            return self.stored_dtype(i)
        return moved_dtype(self.stored_dtype(i), self.compute_dtypes[i])

    def set_disk_dtype(self, i: int, dtype: torch.dtype) -> None:
        """Values of slot ``i`` read from the weights source are rounded to ``dtype``."""
        self.disk_dtypes[i] = dtype

    def placed(self, i: int) -> bool:
        """Whether slot ``i``'s home is on the computation device already: no copy is made."""
        home = self.home[i]
        return home is not None and home.device == self.device

    # -- the model's view ----------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self, tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """Put ``tensors`` where the model holds this unit's parameters, then the faces back."""
        self._place(tensors)
        try:
            yield
        finally:
            self.show()

    def call_with(self, tensors: tuple[torch.Tensor, ...], fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``fn(*args, **kwargs)`` with ``tensors`` swapped in for this unit's parameters."""
        with self.swapped(tensors):
            return fn(*args, **kwargs)

    def show(self) -> None:
        """Give the model this unit's faces."""
        self._place(tuple(self.face))

    def set_home(self, i: int, tensor: torch.Tensor | None) -> None:
        """Make ``tensor`` (None: the weights source) slot ``i``'s home."""
        if tensor is not None and not isinstance(tensor, torch.nn.Parameter):
            grad = self.slots[i].requires_grad and tensor.is_floating_point()
            tensor = torch.nn.Parameter(tensor, requires_grad=grad)
        self.home[i] = tensor
        self._show(i)

    def _place(self, tensors: tuple[torch.Tensor, ...]) -> None:
        for slot, t in zip(self.slots, tensors):
            for module, local in slot.places:
                module._parameters[local] = t

    def _show(self, i: int) -> None:
        """Give the model slot ``i``'s face: the home when usable as is, else a meta stand-in."""
        slot, old, dtype = self.slots[i], self.face[i], self.compute_dtypes[i]
        home = self.home[i]
        if self.placed(i) and home is not None and home.dtype == dtype:
            face = home
        elif old.is_meta and old.dtype == dtype:
            face = old
        else:
            meta = torch.empty(slot.shape, dtype=dtype, device="meta")
            face = torch.nn.Parameter(meta, requires_grad=slot.requires_grad and meta.is_floating_point())
        self.face[i] = face
        for module, local in slot.places:
            module._parameters[local] = face


def moved_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype bytes cross to the device in: the narrower of the two, so an upcast runs there.

    Examples
    --------
    >>> moved_dtype(torch.float8_e4m3fn, torch.bfloat16), moved_dtype(torch.float32, torch.bfloat16)
    (torch.float8_e4m3fn, torch.bfloat16)
    """
    return stored if stored.itemsize < compute.itemsize else compute


def rest_dtype(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` rests in when ``wanted`` is asked for.

    Its own when it converts exactly into ``wanted`` (an fp8 file asked for bf16: the smaller
    bytes, the same values), and integer tensors always keep their own.

    Examples
    --------
    >>> rest_dtype(torch.float32, torch.float8_e4m3fn), rest_dtype(torch.float8_e4m3fn, torch.bfloat16)
    (torch.float8_e4m3fn, torch.float8_e4m3fn)
    """
    if wanted is None or not dtype.is_floating_point or exactly_widens(dtype, wanted):
        return dtype
    return wanted


def read_run(ref: WeightRef) -> torch.Tensor:
    """``ref``'s stored bytes in host memory, as the flat run of its stored dtype."""
    raw = torch.empty(ref.nbytes, dtype=torch.uint8)
    ref.read_into(raw)
    return raw.view(ref.dtype)


@torch.no_grad()
def read_tensor(ref: WeightRef, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor on ``device`` in ``dtype`` holding ``ref``'s stored values (rounded once)."""
    return read_stored(ref.source, ref.key).to(device=device, dtype=dtype)


class UnitBuilder:
    """Builds the units of one model: finds each parameter's stored bytes and checks them.

    A parameter is found in ``source`` under its own name, any tied twin's name, or the
    checkpoint name transformers would load it from (:func:`vramfx.weights.find_key`, as compiled
    graphs find theirs). Problems are collected, not raised one at a time, so
    :meth:`raise_problems` lists them all before anything is changed.
    """

    def __init__(self, model: torch.nn.Module, source: object | None) -> None:
        self.source = source
        groups = tensor_aliases(model).values()
        self.aliases = {name: (name, *(n for n in names if n != name)) for names in groups for name in names}
        self.renamed = checkpoint_key_map(model, source) if isinstance(source, Mapping) else {}
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def ref(self, name: str, shape: tuple[int, ...], *, required: bool) -> WeightRef | None:
        """``name``'s stored bytes, or None; a missing one is a problem when ``required``."""
        source = self.source
        key = find_key(source, self.aliases.get(name, (name,)), self.renamed) if source is not None else None
        if key is None:
            if required:
                self.missing.append(name)
            return None
        info = source.info(key)  # type: ignore[union-attr]
        decoder = decoder_of(source, key)  # GGUF blocks, scaled fp8: a flat run decoded per call
        stored_shape = tuple(decoder.shape) if decoder is not None else tuple(info.shape)
        if stored_shape != tuple(shape):
            self.mismatched.append(f"{key}: stored {stored_shape}, model expects {tuple(shape)}")
            return None
        if decoder is not None:
            return WeightRef(name, source, key, tuple(shape), decoder.stored_dtype, decoder.nbytes, decoder=decoder)  # type: ignore[arg-type]
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


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", … ({len(items)} in all)" if len(items) > _LISTED else "")


@torch.no_grad()
def move_home(unit: Unit, placement: Placement) -> bool:
    """Move ``unit``'s homes to ``placement``: the disk map (no tensor), or real tensors there.

    Floating-point values are converted to the placement's dtype once, as they arrive (see
    :func:`rest_dtype`); read from the disk map, they are rounded to it at every read. Returns
    whether anything moved (a plan made for the old homes is then stale).
    """
    moved = False
    for i, slot in enumerate(unit.slots):
        home = unit.home[i]
        if unit.decoded(i):  # its stored run, as the file holds it: the placement's dtype does not apply
            assert slot.ref is not None
            want = placement.device
            if want is None and home is not None:
                unit.set_home(i, None)
                moved = True
            elif want is not None and (home is None or home.device != want):
                unit.set_home(i, read_run(slot.ref).to(want) if home is None else home.detach().to(want))
                moved = True
            continue
        if placement.on_disk:
            assert slot.ref is not None, "a unit placed on disk has every weight in the disk map"
            dtype = rest_dtype(slot.ref.dtype, placement.dtype)
            moved |= home is not None or unit.disk_dtypes[i] != dtype
            unit.set_disk_dtype(i, dtype)
            if home is not None:
                unit.set_home(i, None)
            continue
        assert placement.device is not None
        if home is None:
            assert slot.ref is not None, "a parameter without a home or stored bytes passed the unit checks"
            unit.set_home(i, read_tensor(slot.ref, placement.device, rest_dtype(slot.ref.dtype, placement.dtype)))
            moved = True
            continue
        dtype = rest_dtype(home.dtype, placement.dtype)
        if home.device != placement.device or home.dtype != dtype:
            unit.set_home(i, home.detach().to(placement.device, dtype))
            moved = True
    return moved


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


def loose_tensors(model: torch.nn.Module, builder: UnitBuilder, covered: set[int]) -> list[LooseTensor]:
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
    loose: list[LooseTensor],
    device: torch.device,
    parameter_dtype: Placement,
    *,
    buffer_dtype: torch.dtype | None = None,
) -> None:
    """Put ``loose`` tensors on ``device`` (parameters in ``parameter_dtype``'s dtype, floating
    buffers in ``buffer_dtype`` when given)."""
    buffers = Placement(device, buffer_dtype)
    for t in loose:
        store = t.store
        current = store[t.local]
        dtype = (parameter_dtype if t.kind == "parameter" else buffers).dtype_for(current.dtype)
        if current.is_meta:
            assert t.ref is not None, "a meta tensor without stored bytes passed the checks"
            new = read_tensor(t.ref, device, dtype)
        elif current.device != device or current.dtype != dtype:
            new = current.detach().to(device, dtype)
        else:
            continue
        if t.kind == "parameter":
            new = torch.nn.Parameter(new, requires_grad=current.requires_grad and new.is_floating_point())
        store[t.local] = new
