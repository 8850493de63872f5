"""``vramfx.from_pretrained``: a model folder laid out as diffusers and transformers save them, compiled in one line.

Loading a checkpoint by hand has three traps: the model must be built in the dtype the checkpoint
stores (hub checkpoints are bf16; ``from_config`` builds fp32), the weights files must be the
ones ``from_pretrained`` would read (a folder may hold an fp16 ``variant`` beside the fp32 files),
and a pipeline's root holds its models in subfolders. This module reads the config, builds the
model empty in the stored dtype, opens a DiskMap over the chosen files and compiles.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vramfx.errors import WeightsError
from vramfx.init import skip_model_initialization
from vramfx.storage.diskmap import DiskMap
from vramfx.storage.variants import weight_files
from vramfx.util import dtype_name

log = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"


def from_pretrained(
    model_class: type[torch.nn.Module],
    path: str | os.PathLike,
    *,
    budget: int | str,
    subfolder: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    config: Mapping[str, Any] | Any | None = None,
    **compile_kwargs: Any,
) -> Any:
    """Build ``model_class`` from a saved folder with no weights in memory, and compile it.

    Parameters
    ----------
    model_class:
        A diffusers ``ModelMixin`` or transformers ``PreTrainedModel`` subclass
        (``FluxTransformer2DModel``, ``LlamaForCausalLM``).
    path:
        The model's folder (``config.json`` and safetensors weights, sharded or not), a pipeline's
        root (with ``model_index.json``: the component of ``model_class``'s class is chosen, or
        pass ``subfolder``), or one safetensors file (with ``config=``, or a ``config.json``
        beside it).
    budget:
        As for :func:`vramfx.compile`.
    subfolder:
        The component's folder under ``path`` (``"transformer"``).
    variant:
        Read the weights saved in this variant (``"fp16"``: ``*.fp16.safetensors``), as
        ``from_pretrained`` does; by default the files without one.
    torch_dtype:
        The dtype to compute in. By default the dtype the checkpoint stores its floating-point
        weights in (most bytes), so a bf16 checkpoint runs in bf16 as ``from_pretrained(...,
        torch_dtype=torch.bfloat16)`` does. Another dtype is given to :func:`vramfx.compile` as
        ``compute_dtype`` (the stored weights read as they are where they are narrower, else
        converted once into host memory).
    key_map:
        Renames stored keys (DiskMap's ``key_map``). A prefix every key carries
        (``model.diffusion_model.``) is found and stripped without one.
    config:
        The model's config (a dict for diffusers, a ``PretrainedConfig`` or dict for
        transformers), for a single file without a ``config.json``.
    **compile_kwargs:
        Passed to :func:`vramfx.compile` (``device``, ``example_kwargs``, ``calls``, ...).

    Returns
    -------
    CompiledModule
        An instance of ``model_class`` (``isinstance(fast, model_class)``), as ``compile`` returns.

    Raises
    ------
    WeightsError
        No config or weights where they were looked for; the message says what the folder holds.
    ValueError
        A pipeline root whose components do not say which one to read (pass ``subfolder``).

    Examples
    --------
    >>> import tempfile, vramfx
    >>> from transformers import LlamaConfig, LlamaModel
    >>> folder = tempfile.mkdtemp()
    >>> LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=2)).to(torch.bfloat16).save_pretrained(folder)
    >>> fast = vramfx.from_pretrained(LlamaModel, folder, budget="64MiB", device="cpu")
    >>> isinstance(fast, LlamaModel), fast.dtype
    (True, torch.bfloat16)
    """
    from vramfx.compiler import compile  # compile pulls in torch.export: imported on use

    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise TypeError(f"model_class must be a torch.nn.Module subclass, got {model_class!r}")
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    if subfolder is not None and not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a str, got {type(subfolder).__name__}")
    if variant is not None and not isinstance(variant, str):
        raise TypeError(f"variant must be a str such as 'fp16', got {type(variant).__name__}")
    folder, file = component_location(model_class, Path(path), subfolder)
    weights = DiskMap(file if file is not None else weight_files(folder, variant), key_map=key_map)
    stored = stored_dtype(weights)
    dtype = torch_dtype or stored or torch.get_default_dtype()
    model = build_empty(model_class, folder, dtype, config)
    if stored is not None and dtype != stored:
        compile_kwargs.setdefault("compute_dtype", dtype)
        compile_kwargs.setdefault("storage_dtype", stored if stored.itemsize <= dtype.itemsize else dtype)
        compile_kwargs.setdefault("keep_in_compute_dtype", None)
    log.info(
        "vramfx.from_pretrained: %s from %s (%s, stored %s)", model_class.__name__,
        file or folder, dtype_name(dtype), dtype_name(stored) if stored else "no floating weights",
    )
    return compile(model, budget, weights=weights, **compile_kwargs)


def component_location(model_class: type, path: Path, subfolder: str | None) -> tuple[Path, Path | None]:
    """The model's folder, and the single weights file when ``path`` is one."""
    if not path.exists():
        raise WeightsError(f"{path} does not exist.")
    if path.is_file():
        return path.parent, path
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder{'; check subfolder=' if subfolder else ''}.")
    index = folder / PIPELINE_INDEX
    if subfolder is None and index.is_file():
        return pipeline_component(model_class, folder, json.loads(index.read_text())), None
    return folder, None


def pipeline_component(model_class: type, root: Path, index: Mapping[str, Any]) -> Path:
    """The subfolder of a pipeline root that holds a ``model_class``."""
    components = {
        name: value[1] for name, value in index.items()
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], str)
    }
    names = {c.__name__ for c in model_class.__mro__}
    matches = [name for name, cls in components.items() if cls == model_class.__name__]
    matches = matches or [name for name, cls in components.items() if cls in names]
    listed = ", ".join(f"{n} ({c})" for n, c in components.items())
    if len(matches) != 1:
        which = "several components" if matches else "no component"
        raise ValueError(
            f"{root} is a pipeline's root ({PIPELINE_INDEX}) and {which} of it is a {model_class.__name__}: "
            f"{listed}. Pass subfolder='<component>'."
        )
    log.info("%s is a pipeline's root: reading %s from its %r subfolder", root, model_class.__name__, matches[0])
    return root / matches[0]


def stored_dtype(weights: DiskMap) -> torch.dtype | None:
    """The floating-point dtype holding most of the checkpoint's bytes (None: no floating weights)."""
    totals: dict[torch.dtype, int] = {}
    for key in weights:
        info = weights.info(key)
        if info.dtype.is_floating_point:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    return max(totals, key=totals.__getitem__) if totals else None


def build_empty(model_class: type, folder: Path, dtype: torch.dtype, config: Any = None) -> torch.nn.Module:
    """``model_class`` from its config, with meta parameters in ``dtype``, in eval mode.

    transformers models are built as its ``from_pretrained(torch_dtype=...)`` builds them
    (``_from_config``: modules it keeps in float32 stay so, buffers it computes in float32 too);
    diffusers models are built from their config and cast, as diffusers casts them.
    """
    with skip_model_initialization():
        if hasattr(model_class, "_from_config") and hasattr(model_class, "config_class"):
            if config is None or isinstance(config, Mapping):
                config = _transformers_config(model_class, folder, config)
            model = model_class._from_config(config, dtype=dtype)
        elif hasattr(model_class, "load_config") and hasattr(model_class, "from_config"):
            if config is None:
                if not (folder / "config.json").is_file():
                    raise WeightsError(f"{folder} holds no config.json; pass config= (the model's config dict).")
                config = model_class.load_config(folder)
            model = model_class.from_config(config)
            torch.nn.Module.to(model, dtype)  # ModelMixin.to warns about casting; from_pretrained casts so
        else:
            raise TypeError(
                f"{model_class.__name__} is neither a diffusers ModelMixin nor a transformers PreTrainedModel; "
                "build it under vramfx.skip_model_initialization() and call vramfx.compile(model, budget, "
                "weights=DiskMap(folder))"
            )
    return model.eval()


def _transformers_config(model_class: type, folder: Path, values: Mapping[str, Any] | None) -> Any:
    config_class = model_class.config_class
    if values is not None:
        return config_class(**values)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} holds no config.json; pass config= (the model's config).")
    return config_class.from_pretrained(folder)
