"""load_state_dict: read a whole checkpoint, safetensors or weights-only pickle, into memory."""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vramfx.arguments import require_device
from vramfx.errors import WeightsError
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.files import PICKLE_SUFFIXES, PathLike, is_pickle_index, open_regular, read_index

__all__ = ["load_state_dict"]

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")


def load_state_dict(
    path: PathLike | Sequence[PathLike],
    device: torch.device | str | torch.dtype = "cpu",
    dtype: torch.dtype | torch.device | str | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    pin_memory: bool = False,
    verbose: int = 0,
) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint into a plain ``dict``.

    Only safetensors can be streamed: to run a model whose weights do not fit in memory, pass a
    :class:`~vramfx.DiskMap` to ``compile`` instead of loading it whole here. Pickle formats are
    read whole, with ``weights_only=True`` (no code from the file runs).

    DiffSynth-Studio's calls work unchanged: ``load_state_dict(path, torch_dtype, device)`` (a
    dtype where the device goes is read in that order), ``torch_dtype=``, ``pin_memory=``,
    ``verbose=``, a list mixing safetensors and pickle files, and the ``model_state`` wrapper.

    Parameters
    ----------
    path:
        Safetensors (anything :class:`~vramfx.DiskMap` accepts: a file, a list of files, a
        ``*.index.json``, a folder), or a pickle checkpoint: ``.bin``, ``.pt``, ``.pth``,
        ``.ckpt``, a ``pytorch_model.bin.index.json`` of pickle shards, or a folder holding one
        pickle checkpoint or such an index; or a list of any of these. A one-key wrapper
        ``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}`` or
        ``{"model_state": ...}`` is unwrapped.
    device:
        Where the tensors go.
    dtype, torch_dtype:
        If given (either name), floating-point tensors are cast to it; other dtypes are kept.
    pin_memory:
        Page-lock the loaded CPU tensors (faster copies to a GPU).
    verbose:
        ``>= 1`` logs each file as it is loaded (at INFO level).

    Returns
    -------
    dict[str, torch.Tensor]
        Name to tensor, read into memory: a file changed or truncated afterwards changes
        nothing here.

    Raises
    ------
    WeightsError
        If the pickle holds anything but tensors and plain containers (it is refused, and the
        message says how to convert it to safetensors), if it is not a flat mapping of names to
        tensors, if a tensor is in two files, or for anything :class:`~vramfx.DiskMap` refuses.

    Examples
    --------
    >>> import tempfile
    >>> p = tempfile.mktemp(suffix=".pt")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}}, p)
    >>> load_state_dict(p, dtype=torch.float16)
    {'w': tensor([1., 1.], dtype=torch.float16)}
    >>> load_state_dict(p, torch.float16, "cpu")  # DiffSynth-Studio's order
    {'w': tensor([1., 1.], dtype=torch.float16)}
    """
    if isinstance(device, torch.dtype):  # load_state_dict(path, torch_dtype, device)
        device, dtype = (dtype if dtype is not None else "cpu"), device
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} differ; pass one of them")
        dtype = torch_dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch.dtype (e.g. torch.bfloat16).")
    device = require_device("device", device)
    if isinstance(path, (list, tuple)) and any(_pickle_files(p) is not None for p in path):
        state: dict[str, torch.Tensor] = {}
        for part in path:
            for name, tensor in load_state_dict(part, device, dtype, pin_memory=pin_memory, verbose=verbose).items():
                if name in state:
                    raise WeightsError(f"tensor {name!r} is in two of the files given; the second is {part}.")
                state[name] = tensor
        return state
    if verbose >= 1:
        log.info("loading %s", path)
    pickles = _pickle_files(path)
    if pickles is None:
        with DiskMap(path, device=device, dtype=dtype) as dm:  # type: ignore[arg-type]
            state = dict(dm.items())
    else:
        state = {}
        for file in pickles:
            for name, tensor in _load_pickle(file).items():
                if name in state:
                    raise WeightsError(f"tensor {name!r} is in two pickle shards; the second is {file}.")
                state[name] = _place(tensor, device, dtype)
    if pin_memory:
        state = {name: t.pin_memory() if t.device.type == "cpu" else t for name, t in state.items()}
    return state


def _pickle_files(path: PathLike | Sequence[PathLike]) -> list[Path] | None:
    """The pickle files ``path`` names, or None when it names safetensors."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(path)
    if p.is_dir():
        if any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")):
            return None
        indexes = [i for i in p.glob("*.index.json") if is_pickle_index(i)]
        candidates = indexes or [c for c in p.iterdir() if c.suffix in PICKLE_SUFFIXES and c.is_file()]
        if len(candidates) != 1:
            found = ", ".join(sorted(c.name for c in candidates)) or "none"
            raise WeightsError(
                f"{p} holds no safetensors; expected exactly one pickle checkpoint or index, found {found}."
            )
        p = candidates[0]
    if p.suffix in PICKLE_SUFFIXES:
        return [p]  # opened as a regular file, or refused naming what it is, when read
    if is_pickle_index(p):
        return sorted(set(read_index(p).values()))
    return None


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Unpickle ``file`` with weights_only; unwrap one-key wrappers; check it is names to tensors."""
    # Read into memory, never mapped: a file changed or truncated later cannot change the
    # tensors, nor fault (SIGBUS) on a page that is gone.
    with os.fdopen(open_regular(file), "rb") as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _not_weights_only(file, err) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise WeightsError(f"{file} could not be read as a torch checkpoint: {err}") from None
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{file} holds a {type(obj).__name__}, expected a mapping of names to tensors.")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5])
        raise WeightsError(
            f"{file} is not a flat mapping of names to tensors (entries {shown} are not); "
            f"a one-key wrapper ({', '.join(_WRAPPER_KEYS)}) is unwrapped, other layouts are not."
        )
    return dict(obj)


def _not_weights_only(file: Path, err: pickle.UnpicklingError) -> WeightsError:
    """The refusal of a pickle that is not weights-only, with a one-line conversion."""
    return WeightsError(
        f"{file} is not a weights-only pickle, so vramfx will not unpickle it (that could run "
        f"code from the file). torch says: {_unpickler_reason(err)}\n"
        f"If you trust the file, convert it once to safetensors and load that instead:\n"
        f"  python -c \"import torch, safetensors.torch as st; "
        f"sd = torch.load('{file}', weights_only=False); sd = sd.get('state_dict', sd); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{file.with_suffix('.safetensors')}')\""
    )


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The one line of torch's weights-only error that says what was refused."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(err))
    return found.group(1).strip() if found else str(err).strip().splitlines()[0]


def _place(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` on ``device``, cast to ``dtype`` if it is floating point."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device)

