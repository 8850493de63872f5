"""Where each captured weight is read from: the module itself, or the weights mapping.

Runs between capture and planning. It checks, before anything is allocated, that every weight the
graph reads has a source whose shape and dtype match the model, so a bad checkpoint fails at
compile time with every problem listed, not halfway through a call.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from vramfx.errors import WeightsError
from vramfx.plan.types import StoredFormat
from vramfx.precision import exactly_widens
from vramfx.quant.decoders import Decoder
from vramfx.storage.checkpoint_keys import adapter_free_name
from vramfx.storage.converted import ConvertedSource, read_stored, serve_converted
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.foreign import source_of
from vramfx.storage.formats import interpret, open_weights
from vramfx.storage.host import HostSource
from vramfx.storage.ref import WeightRef, is_disk_source
from vramfx.storage.source import WeightSource
from vramfx.util import dtype_name

if TYPE_CHECKING:
    from vramfx.capture import WeightSpec

log = logging.getLogger(__name__)

_LISTED = 10


def decoder_of(source: object, key: str) -> Decoder | None:
    """How ``source``'s stored bytes of ``key`` become values; ``None`` for plain tensors."""
    decoder = getattr(source, "decoder", None)
    return decoder(key) if callable(decoder) else None


def as_source(weights: Mapping[str, torch.Tensor] | str | os.PathLike | Sequence | None) -> WeightSource | None:
    """Turn what a user may pass as ``weights`` into a WeightSource: a path becomes a DiskMap or a
    GGUFMap; a scaled-fp8 checkpoint (by its names) is read with its scales; a DiffSynth-Studio
    DiskMap is read as :func:`vramfx.storage.foreign.source_of` says."""
    if weights is None:
        return None
    foreign = source_of(weights)
    if foreign is not None:
        return interpret(foreign)
    if isinstance(weights, (str, os.PathLike)) or (
        isinstance(weights, (list, tuple)) and all(isinstance(w, (str, os.PathLike)) for w in weights)
    ):
        return open_weights(weights)
    if hasattr(weights, "read_into") and hasattr(weights, "info"):
        return interpret(weights)  # type: ignore[return-value]
    if isinstance(weights, Mapping):
        return interpret(_LazyHostSource(weights))
    raise ValueError(
        f"weights must be a DiskMap, a path to safetensors weights, or a Mapping of name to "
        f"tensor; got {type(weights).__name__}"
    )


class _LazyHostSource(HostSource):
    """A plain ``Mapping[str, Tensor]`` served as a WeightSource, touching only keys asked for
    (``__getitem__`` gives the tensor itself, so a runtime can pin it in place or copy parts)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors  # type: ignore[assignment]

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self._tensors[key].detach().contiguous().reshape(-1).view(torch.uint8))


def resolve_weights(
    specs: Sequence[WeightSpec],
    weights: WeightSource | None,
    *,
    renamed: Mapping[str, str] | None = None,
    storage: Mapping[str, torch.dtype] | None = None,
) -> dict[str, WeightRef]:
    """Bind every captured weight to its source, checking names, shapes and dtypes.

    A real tensor on the module is used as it is, except a persistent buffer that ``weights``
    also holds (a checkpoint's running statistics beat the module's initial values). A meta
    tensor must come from ``weights``, under its own name or any tied twin's name, or under
    the checkpoint key ``renamed`` maps that name to.

    Parameters
    ----------
    storage:
        The dtype each weight is stored in, by name (low-precision storage); names it omits are
        stored in the graph's dtype. When given, a floating-point weight whose source holds
        another dtype is read as it is if that dtype converts exactly into the storage dtype (an
        fp8 file for bf16 storage), else converted once, into host memory. Without it, the
        source must hold the graph's dtype. A source with ``casts_plain_tensors`` (GGUF, scaled
        fp8) is exempt from both rules: its floating tensors are held as it stores them and cast
        where they are read.

    A weight the source decodes (``source.decoder(key)``: GGUF blocks, scaled fp8) is held as
    stored, whatever ``storage`` says, and its decoder must give the model's shape; the graph
    reads it in its own dtype.

    Raises
    ------
    WeightsError
        Listing every missing weight and every shape or dtype mismatch.
    """
    host = HostSource({s.name: s.value for s in specs if s.value is not None})
    refs: dict[str, WeightRef] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    converted: dict[int, ConvertedSource] = {}
    for spec in specs:
        key = find_key(weights, spec.aliases, renamed or {}) if weights is not None else None
        from_module = spec.value is not None and not (spec.kind == "buffer" and spec.persistent and key)
        if from_module:
            source, key = host, spec.name
        elif key is not None:
            source = weights
        else:
            missing.append(spec.name)
            continue
        info = source.info(key)
        decoder = decoder_of(source, key)
        if decoder is not None:
            if tuple(decoder.shape) != tuple(spec.shape) or not spec.dtype.is_floating_point:
                mismatched.append(
                    f"{key}: stored {tuple(decoder.shape)} {decoder.format}, model expects "
                    f"{tuple(spec.shape)} {dtype_name(spec.dtype)}"
                )
                continue
            refs[spec.name] = WeightRef(
                spec.name, source, key, spec.shape, decoder.stored_dtype, decoder.nbytes,
                requires_grad=spec.requires_grad, compute_dtype=spec.dtype, decoder=decoder,
            )
            continue
        held = _held_dtype(info.dtype, spec, storage, cast=bool(getattr(source, "casts_plain_tensors", False)))
        if tuple(info.shape) != tuple(spec.shape) or held is None:
            mismatched.append(
                f"{key}: stored {tuple(info.shape)} {dtype_name(info.dtype)}, model expects "
                f"{tuple(spec.shape)} {dtype_name(spec.dtype)}"
            )
            continue
        if held != info.dtype:
            source = serve_converted(converted, source, key, held)
            info = source.info(key)
        refs[spec.name] = WeightRef(
            spec.name, source, key, spec.shape, held, info.nbytes, requires_grad=spec.requires_grad,
            compute_dtype=spec.dtype,
        )
    if missing or mismatched:
        raise WeightsError(_report(missing, mismatched, weights))
    if converted:
        moved = [r for r in refs.values() if isinstance(r.source, ConvertedSource)]
        log.info(
            "%d weight(s) (%d bytes) are converted to their storage dtype once, into host memory; "
            "vramfx.convert writes them so to disk instead",
            len(moved),
            sum(r.nbytes for r in moved),
        )
    return refs


def stored_formats(refs: Mapping[str, WeightRef], device: torch.device) -> dict[str, StoredFormat]:
    """What the planner needs of every decoded weight, by name: stored format and bytes, and
    the workspace and memory traffic of its decode on ``device``."""
    return {
        name: StoredFormat(
            format=ref.decoder.format,
            dtype=dtype_name(ref.dtype),
            nbytes=ref.nbytes,
            workspace_bytes=ref.decoder.workspace_bytes(device),
            traffic_bytes=ref.decoder.traffic_bytes(),
        )
        for name, ref in refs.items()
        if ref.decoder is not None
    }


def stored_state(
    model: torch.nn.Module,
    weights: WeightSource | None,
    *,
    renamed: Mapping[str, str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The model's state dict with every meta tensor read from ``weights`` into host memory.

    Real tensors are the model's own (detached). Tied names share one tensor, read once. A
    weight the source decodes (GGUF, scaled fp8) is decoded into the model's dtype. Floating-point
    tensors are given in ``compute_dtype`` when one is set.

    Raises
    ------
    WeightsError
        Listing every meta tensor ``weights`` does not hold.
    """
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    values: dict[int, torch.Tensor] = {}
    missing: list[str] = []
    for identity, tensor in tensors.items():
        if not tensor.is_meta:
            values[identity] = tensor.detach()
            continue
        key = find_key(weights, names[identity], renamed or {}) if weights is not None else None
        if key is None:
            missing.append(names[identity][0])
            continue
        decoder = decoder_of(weights, key)
        if decoder is None:
            values[identity] = read_stored(weights, key)
            continue
        raw = torch.empty(decoder.nbytes, dtype=torch.uint8)  # GGUF blocks, scaled fp8: decoded
        weights.read_into(key, raw)
        values[identity] = torch.empty(tuple(decoder.shape), dtype=compute_dtype or tensor.dtype)
        decoder.decode_into(raw.view(decoder.stored_dtype), values[identity])
    if missing:
        raise WeightsError(_report(missing, [], weights))
    if compute_dtype is not None:
        values = {i: v.to(compute_dtype) if v.is_floating_point() else v for i, v in values.items()}
    return {name: values[id(tensor)] for name, tensor in state.items()}


def _held_dtype(
    stored: torch.dtype, spec: WeightSpec, storage: Mapping[str, torch.dtype] | None, *, cast: bool = False
) -> torch.dtype | None:
    """The dtype a weight's bytes are held in, or ``None`` if its source cannot provide it.

    ``cast``: the source's floating tensors are held as the file stores them and cast where they
    are read, whatever the storage policy (GGUF and scaled-fp8 files, whose loaders do so; no
    converted copy in host memory, which on CPU would sit outside the budget).
    """
    wanted = storage.get(spec.name, spec.dtype) if storage is not None else spec.dtype
    if stored == wanted:
        return stored
    if not (stored.is_floating_point and wanted.is_floating_point):
        return None
    if cast:
        return stored
    if storage is None:
        return None
    return stored if exactly_widens(stored, wanted) else wanted


def find_key(weights: WeightSource, names: Sequence[str], renamed: Mapping[str, str]) -> str | None:
    """The key ``weights`` holds a tensor under: any of its ``names`` (tied twins), the name it had
    before an adapter wrapped its layer (:func:`~vramfx.storage.checkpoint_keys.adapter_free_name`),
    or the checkpoint key ``renamed`` maps one of them to. Both front ends bind weights with it."""
    names = [*names, *(n for n in map(adapter_free_name, names) if n not in names)]
    candidates = [*names, *(renamed[n] for n in names if n in renamed)]
    return next((n for n in candidates if n in weights), None)




def _report(missing: list[str], mismatched: list[str], weights: object) -> str:
    """What is wrong, the fix first: a model built in another dtype than the checkpoint's, or a
    prefix the stored keys carry, is said before the list of names."""
    lines = []
    dtypes = _dtype_only(mismatched)
    if dtypes is not None:
        stored, built = dtypes
        lines.append(
            f"The checkpoint stores {stored} weights and the model was built in {built}: build the model in "
            f"{stored} (vramfx.from_pretrained(ModelClass, folder, budget=...) does; or model.to(torch.{stored}) "
            f"before compile), or pass compute_dtype=torch.{built}, storage_dtype=torch.{stored} to compute in {built}."
        )
    if missing:
        shown = ", ".join(missing[:_LISTED]) + (f", … ({len(missing)} in all)" if len(missing) > _LISTED else "")
        where = "no weights were given" if weights is None else "not found in the weights"
        lines.append(
            f"{len(missing)} meta parameter(s) have no weight ({where}): {shown}. Pass "
            "weights=DiskMap(path) holding them (check key names; DiskMap's key_map renames keys)."
        )
        if weights is not None and isinstance(weights, Mapping):
            lines.append(_stored_keys_hint(missing, weights))
    if mismatched:
        listed = 3 if dtypes is not None else _LISTED
        shown = "; ".join(mismatched[:listed]) + (f"; … ({len(mismatched)} in all)" if len(mismatched) > listed else "")
        lines.append(
            f"{len(mismatched)} weight(s) differ from the model: {shown}."
            + ("" if dtypes is not None else " Build the model with the checkpoint's config and dtype (or pass "
               "compute_dtype= / storage_dtype= to convert).")
        )
    return " ".join(lines)


def _dtype_only(mismatched: list[str]) -> tuple[str, str] | None:
    """(stored, built) dtype names when every mismatch is the same dtype difference at equal shapes."""
    pairs = set()
    for line in mismatched:
        match = re.search(r"stored (\(.*?\)) (\w+), model expects (\(.*?\)) (\w+)$", line)
        if match is None or match.group(1) != match.group(3):
            return None
        pairs.add((match.group(2), match.group(4)))
    return next(iter(pairs)) if len(pairs) == 1 else None


def _stored_keys_hint(missing: list[str], weights: Mapping) -> str:
    """A few keys the weights hold, and the prefix they seem to carry, for a name mismatch."""
    keys = list(itertools.islice(iter(weights), 2000))
    shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
    prefix = next(
        (k[: -len(n)] for n in missing[:16] for k in keys if k.endswith("." + n)), None
    )
    hint = f" They seem to carry the prefix {prefix!r}: pass key_map=lambda k: k.removeprefix({prefix!r})." if prefix else ""
    return f"The weights hold {len(weights)} key(s), e.g. {shown}.{hint}"
