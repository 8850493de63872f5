"""Low-precision storage: which weights are held in a smaller dtype and which stay in the compute dtype.

A model compiled with ``storage_dtype`` holds its floating-point parameters in that dtype (on disk,
in host memory, in the arena, resident) and computes in ``compute_dtype``: the plan casts each
weight up right before the nodes that read it. A *keep list* names the weights that are held in
the compute dtype instead; the default, ``"auto"``, is documented in ``docs/low-precision.md``
with where its rules come from.

This module decides, per weight, the dtype it is stored in. It runs between capture and weight
binding; it reads the model's module tree (names and classes) and nothing later in the flow.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from vramfx.util import dtype_name

#: Dtypes weights may be stored in.
STORAGE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float32)
#: Dtypes the graph may compute in.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Keep-list presets.
PRESETS = ("auto", "minimal")

#: Module-name patterns (regular expressions searched in each dotted module name) that diffusers
#: leaves in the compute dtype when it stores a model's layers in a low dtype: positional and patch
#: embeddings, normalization and modulation layers, and the first and last projections.
DIFFUSERS_DEFAULT_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")

_NORM_TYPES = (
    torch.nn.modules.normalization.LayerNorm,
    torch.nn.modules.normalization.GroupNorm,
    torch.nn.modules.normalization.RMSNorm,
    torch.nn.modules.normalization.LocalResponseNorm,
    torch.nn.modules.batchnorm._NormBase,
)
_EMBEDDING_TYPES = (torch.nn.Embedding, torch.nn.EmbeddingBag)
_GLOB_CHARS = frozenset("*?[")

KeepItem = str | type
KeepSpec = KeepItem | Sequence[KeepItem] | None

# Every value of the key dtype is a value of each dtype in its set, so converting loses nothing.
_EXACT_WIDENINGS: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.float8_e4m3fn: frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64}),
    torch.float8_e5m2: frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64}),
    torch.bfloat16: frozenset({torch.float32, torch.float64}),
    torch.float16: frozenset({torch.float32, torch.float64}),
    torch.float32: frozenset({torch.float64}),
}


@dataclass(frozen=True)
class Precision:
    """The dtypes a compiled model stores and computes in, and what it keeps in the compute dtype.

    ``storage_dtype`` ``None`` stores every weight in its compute dtype; ``compute_dtype`` ``None``
    computes each weight in the dtype the model declares for it.
    """

    storage_dtype: torch.dtype | None
    compute_dtype: torch.dtype | None
    keep: tuple[KeepItem, ...]


def precision_from_arguments(
    storage_dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None,
    keep_in_compute_dtype: KeepSpec,
) -> Precision | None:
    """Check ``compile``'s precision arguments; ``None`` when neither dtype is asked for.

    Raises
    ------
    ValueError
        Naming the argument that is not a supported dtype or keep list.
    """
    if storage_dtype is not None and not (isinstance(storage_dtype, torch.dtype) and storage_dtype in STORAGE_DTYPES):
        raise ValueError(f"storage_dtype must be one of {_names(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype in COMPUTE_DTYPES):
        raise ValueError(f"compute_dtype must be one of {_names(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if (
        storage_dtype is not None
        and compute_dtype is not None
        and storage_dtype.itemsize > compute_dtype.itemsize
    ):
        raise ValueError(
            f"storage_dtype {dtype_name(storage_dtype)} is wider than compute_dtype {dtype_name(compute_dtype)}; "
            "storage is for holding weights in fewer bytes than they compute in"
        )
    keep = keep_items(keep_in_compute_dtype)
    if storage_dtype is None and compute_dtype is None:
        return None
    return Precision(storage_dtype, compute_dtype, keep)


def keep_items(keep_in_compute_dtype: KeepSpec) -> tuple[KeepItem, ...]:
    """A keep list as a tuple of presets, names, glob patterns and module classes.

    Raises
    ------
    ValueError
        If an item is neither a string nor an ``nn.Module`` subclass.
    """
    if keep_in_compute_dtype is None:
        return ()
    if isinstance(keep_in_compute_dtype, (str, type)):
        items: tuple = (keep_in_compute_dtype,)
    elif isinstance(keep_in_compute_dtype, (list, tuple, set, frozenset)):
        items = tuple(keep_in_compute_dtype)
    else:
        items = (keep_in_compute_dtype,)  # refused below, named
    for item in items:
        if isinstance(item, str) and item:
            continue
        if isinstance(item, type) and issubclass(item, torch.nn.Module):
            continue
        raise ValueError(
            "keep_in_compute_dtype takes 'auto', 'minimal', weight or module names, glob patterns "
            f"('*.norm*') and nn.Module classes, or a list of them; got {item!r}"
        )
    return items


def exactly_widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Every value of ``source`` is also a value of ``target``: converting loses nothing.

    Examples
    --------
    >>> exactly_widens(torch.float8_e4m3fn, torch.bfloat16), exactly_widens(torch.float16, torch.bfloat16)
    (True, False)
    """
    return source == target or target in _EXACT_WIDENINGS.get(source, ())


def kept_names(model: torch.nn.Module, keep: Sequence[KeepItem]) -> set[str]:
    """Names of the parameters ``keep`` holds in the compute dtype, every tied name included.

    Parameters
    ----------
    model:
        The model; only its module tree is read, so meta parameters are fine.
    keep:
        Items as :func:`keep_items` returns them.

    Returns
    -------
    set[str]

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> sorted(kept_names(model, ("auto",)))
    ['0.bias', '1.bias', '1.weight']
    """
    declared = declared_patterns(model)
    by_tensor: dict[int, list[str]] = {}
    kept_tensors: set[int] = set()
    for name, tensor, owners in _walk(model, owners=(("", type(model)),)):
        by_tensor.setdefault(id(tensor), []).append(name)
        if keeps(name, tensor.dim(), owners, keep, declared):
            kept_tensors.add(id(tensor))
    return {name for key in kept_tensors for name in by_tensor[key]}


def keeps(
    name: str,
    ndim: int,
    owners: Sequence[tuple[str, type | None]],
    keep: Sequence[KeepItem],
    declared: Sequence[str] = (),
) -> bool:
    """Whether one parameter stays in the compute dtype.

    ``owners`` are the modules that contain it, from the root's first child down to the one that
    holds it, as ``(dotted name, class)``; the class is ``None`` when only names are known (a
    checkpoint converted without its model). ``declared`` are the model's own patterns of layers
    to keep (diffusers' ``_skip_layerwise_casting_patterns``, ``_keep_in_fp32_modules``).
    """
    for item in keep:
        if item in PRESETS:
            if _generic(name, ndim, owners):
                return True
            if item == "auto" and _matches_patterns(owners, (*DIFFUSERS_DEFAULT_PATTERNS, *declared)):
                return True
        elif isinstance(item, type):
            if any(cls is not None and issubclass(cls, item) for _, cls in owners):
                return True
        elif _matches_name(name, [path for path, _ in owners], item):
            return True
    return False


def owners_from_name(name: str) -> tuple[tuple[str, None], ...]:
    """The dotted module names that contain ``name``, classes unknown."""
    parts = name.split(".")[:-1]
    return tuple((".".join(parts[: i + 1]), None) for i in range(len(parts)))


def storage_dtypes(
    model: torch.nn.Module,
    weights: Iterable,
    precision: Precision,
) -> dict[str, torch.dtype]:
    """The dtype each captured weight is stored in.

    Floating-point parameters outside the keep list are stored in ``precision.storage_dtype``;
    every other weight (kept parameters, buffers, lifted constants, integer tensors) in its
    graph dtype.

    Parameters
    ----------
    model:
        The captured model.
    weights:
        Its :class:`~vramfx.capture.WeightSpec` records.
    precision:
        What :func:`precision_from_arguments` returned.

    Returns
    -------
    dict[str, torch.dtype]
        By weight name.
    """
    kept = kept_names(model, precision.keep) if precision.storage_dtype is not None else set()
    out = {}
    for spec in weights:
        low = (
            precision.storage_dtype is not None
            and spec.kind == "parameter"
            and spec.dtype.is_floating_point
            and not any(alias in kept for alias in spec.aliases)
        )
        out[spec.name] = precision.storage_dtype if low else spec.dtype
    return out


def _generic(name: str, ndim: int, owners: Sequence[tuple[str, type | None]]) -> bool:
    """The rules every preset shares: only the weights of layers that multiply are stored low."""
    if ndim < 2 or name.rsplit(".", 1)[-1] != "weight":
        # Biases, norm scales, modulation tables, learned tokens: small, and a rounding there
        # shifts or scales whole activations.
        return True
    for path, cls in owners:
        if cls is not None and (issubclass(cls, _NORM_TYPES + _EMBEDDING_TYPES) or cls.__name__.endswith("Norm")):
            return True
    return any("embed" in part for part in name.split(".")[:-1])


def _matches_patterns(owners: Sequence[tuple[str, type | None]], patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for path, _ in owners for p in patterns)


def _matches_name(name: str, paths: Sequence[str], item: str) -> bool:
    """An exact weight name, a module containing it, or a glob over either."""
    if name == item or item in paths:
        return True
    if _GLOB_CHARS & set(item):
        return fnmatch.fnmatchcase(name, item) or any(fnmatch.fnmatchcase(p, item) for p in paths)
    return False


def declared_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The layers a model's authors declare precision-sensitive, as module-name patterns.

    diffusers models list them in ``_skip_layerwise_casting_patterns``, transformers and
    diffusers models in ``_keep_in_fp32_modules``; a transformers model's output embedding (the
    language-model head) is added, as its quantizers leave it unquantized.
    """
    patterns: list[str] = []
    for attribute in ("_skip_layerwise_casting_patterns", "_keep_in_fp32_modules"):
        value = getattr(model, attribute, None)
        if isinstance(value, str):
            patterns.append(value)
        elif isinstance(value, Iterable):
            patterns.extend(v for v in value if isinstance(v, str))
    head = _output_embeddings(model)
    if head is not None:
        patterns.extend(f"^{re.escape(name)}$" for name, m in model.named_modules() if m is head and name)
    return tuple(patterns)


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """A transformers model's output embedding module, if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def _walk(
    module: torch.nn.Module, prefix: str = "", owners: tuple[tuple[str, type], ...] = ()
) -> Iterator[tuple[str, torch.Tensor, tuple[tuple[str, type], ...]]]:
    """Every parameter by every name it has, with the modules that contain it."""
    for key, param in module._parameters.items():
        if param is not None:
            yield prefix + key, param, owners
    for key, child in module._modules.items():
        if child is not None:
            path = prefix + key
            yield from _walk(child, path + ".", owners + ((path, type(child)),))


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)
