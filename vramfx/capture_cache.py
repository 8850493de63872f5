"""A persistent cache of captures: a new process capturing the same model on the same call
skips ``torch.export`` (most of compile's start-up time) and reads the captured graph from disk.

An entry is the captured graph as plain data (nodes, targets, the shapes, strides, dtypes and
storage sharing of every intermediate, stack traces, module paths) plus the weight specs; the
model's own tensors are never written, they are bound again from the model at load. It is keyed
by everything the graph is specialised on:

- the cache format, Python, torch and vramfx versions, and a hash of vramfx's own source;
- the model: every submodule's class and its plain attributes (configs included), every
  parameter's and buffer's name, shape, stride, dtype, whether it is meta, ``requires_grad`` and
  ties; the source files of the model's classes and the versions of the packages they come from;
- the call: the input signature (structure, tensor shapes, strides and dtypes, non-tensor
  values), the compute device and dtype, torch's default dtype.

A model with forward hooks, a ``forward`` set on the instance, global module hooks or adapter layers
(PEFT LoRA) is captured
as usual and not cached: what those run is not part of any key.

Entries live in ``$VRAMFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/vramfx``, else ``~/.cache/vramfx``
(under ``captures/``). ``VRAMFX_CACHE=0`` (or ``compile(..., cache=False)``, ``vramfx plan
--no-cache``) turns the cache off. Writes are atomic (a temporary file renamed into place), so
concurrent writers leave one whole entry; an entry that cannot be read is ignored, logged at
debug level and replaced. Entries are pickles: the cache directory must be writable only by
its user, like any Python cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import logging
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.fx

from vramfx import carried
from vramfx.capture import Captured, WeightSpec, capture
from vramfx.adapters.state import is_adapter_layer

log = logging.getLogger(__name__)

#: Bumped whenever the entry layout changes.
CACHE_FORMAT = 1
ENV_DIR = "VRAMFX_CACHE_DIR"
ENV_SWITCH = "VRAMFX_CACHE"
_MAGIC = b"vramfx-capture\n"
_META = torch.device("meta")
#: Node metadata later stages read: shapes (liveness), stack traces (errors), module paths (reports).
_KEPT_META = ("val", "stack_trace", "nn_module_stack")
#: How deep plain attributes of module attributes (an attention processor's settings) are keyed.
_ATTR_DEPTH = 4
#: Config entries that say where a config came from, not what the model computes (diffusers keeps
#: its defaulted names as a set, in an order that varies between processes).
_PROVENANCE_KEYS = frozenset({"_use_default_values", "_name_or_path", "_commit_hash"})


def cache_enabled(cache: bool | None = None) -> bool:
    """Whether captures are cached: ``cache`` if given, else not ``VRAMFX_CACHE=0``."""
    if cache is not None:
        return cache
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off", "")


def cache_dir() -> Path:
    """``$VRAMFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/vramfx``, else ``~/.cache/vramfx``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramfx"


def cached_capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache: bool | None = None,
) -> Captured:
    """:func:`vramfx.capture.capture`, read from the cache when an entry with the same key exists
    and written to it otherwise.

    Parameters
    ----------
    model, args, kwargs, device, dtype:
        As :func:`~vramfx.capture.capture`.
    cache:
        ``False`` captures without the cache; ``None`` follows ``VRAMFX_CACHE``.

    Returns
    -------
    Captured
        Equal to what :func:`~vramfx.capture.capture` returns: the same graph, node names,
        metadata and weights.
    """
    device = torch.device(device)
    kwargs = dict(kwargs or {})
    key = capture_key(model, args, kwargs, device, dtype) if cache_enabled(cache) else None
    if key is None:
        return capture(model, args, kwargs, device=device, dtype=dtype)
    path = cache_dir() / "captures" / f"{key}.pkl"
    found = _load(path, key, model)
    if found is not None:
        log.debug("vramfx: capture of %s read from %s", type(model).__name__, path)
        return found
    captured = capture(model, args, kwargs, device=device, dtype=dtype)
    _store(path, key, captured, model)
    return captured


# -- the key ---------------------------------------------------------------------------------------
def capture_key(
    model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None
) -> str | None:
    """A hex digest of everything a capture of this call depends on; None when it cannot be cached."""
    reason = uncacheable_reason(model)
    if reason:
        log.debug("vramfx: capture of %s not cached: %s", type(model).__name__, reason)
        return None
    from vramfx.compiled import input_signature  # the same signature the in-memory cache keys by

    lifted = carried.lift((tuple(args), dict(kwargs)))
    parts = (
        CACHE_FORMAT,
        sys.version,
        torch.__version__,
        vramfx_version(),
        str(device),
        str(dtype),
        str(torch.get_default_dtype()),
        repr(input_signature(*lifted.tree)),
        _model_digest(model),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def uncacheable_reason(model: torch.nn.Module) -> str | None:
    """Why captures of ``model`` cannot be keyed (hooks, a forward set on an instance, adapters), or None."""
    from torch.nn.modules import module as nn_module

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks"):
        if getattr(nn_module, name, None):
            return "global module hooks are registered"
    for name, module in model.named_modules():
        if is_adapter_layer(module):  # its scales are graph attributes made at capture
            return f"module {name!r} holds adapters"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or type(model).__name__!r} has forward hooks"
        if "forward" in module.__dict__:
            return f"module {name or type(model).__name__!r} has a forward set on the instance"
    return None


_VRAMFX_VERSION: list[str] = []


def vramfx_version() -> str:
    """vramfx's version and a hash of its source: an edited checkout invalidates its entries."""
    if not _VRAMFX_VERSION:
        try:
            version = importlib.metadata.version("vramfx")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        digest = hashlib.sha256()
        root = Path(__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _VRAMFX_VERSION.append(f"{version}:{digest.hexdigest()}")
    return _VRAMFX_VERSION[0]


def block_digest(module: torch.nn.Module) -> str:
    """What a capture of ``module`` depends on besides its code and call: its submodules' classes
    and attributes, its parameters' and buffers' names, shapes, strides and dtypes; siblings with
    the same digest trace to the same graph on the same inputs."""
    return _model_digest(module, code=False)


def _model_digest(model: torch.nn.Module, *, code: bool = True) -> str:
    digest = hashlib.sha256()
    classes: dict[type, None] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        classes[cls] = None
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") or k in ("_internal_dict",)}
        digest.update(repr((name, _qualname(cls), module.training, _plain(attrs, _ATTR_DEPTH, set()))).encode())
    first_name: dict[int, str] = {}
    for kind, tensors in (("p", model.named_parameters(remove_duplicate=False)),
                          ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in tensors:
            tie = first_name.setdefault(id(t), name)
            digest.update(repr((kind, name, tuple(t.shape), t.stride(), str(t.dtype), t.device.type == "meta",
                                t.requires_grad, tie)).encode())
    persistent = sorted(
        f"{prefix}.{b}" if prefix else b
        for prefix, module in model.named_modules(remove_duplicate=False)
        for b in getattr(module, "_non_persistent_buffers_set", ())
    )
    digest.update(repr(persistent).encode())
    if code:
        digest.update(repr(_code_digest(classes)).encode())
    return digest.hexdigest()


def _code_digest(classes: Mapping[type, None]) -> tuple:
    """The source files of the model's classes (torch's own aside) and their packages' versions."""
    files: set[str] = set()
    packages: set[str] = set()
    for cls in classes:
        for base in cls.__mro__:
            module = base.__module__ or ""
            if module.split(".")[0] in ("torch", "builtins"):
                continue
            packages.add(module.split(".")[0])
            try:
                source = inspect.getsourcefile(base)
            except TypeError:
                source = None
            if source:
                files.add(source)
    versions = []
    for package in sorted(packages):
        version = getattr(sys.modules.get(package), "__version__", None)
        versions.append((package, str(version)))
    hashes = []
    for path in sorted(files):
        try:
            hashes.append((path, hashlib.sha256(Path(path).read_bytes()).hexdigest()))
        except OSError:
            hashes.append((path, None))
    return tuple(versions), tuple(hashes)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _plain(value: Any, depth: int, seen: set[int]) -> Any:
    """A process-independent description of ``value``: no addresses, no tensor data."""
    if isinstance(value, (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
        return value
    if isinstance(value, (float, complex)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, torch.nn.Module):
        return ("module", _qualname(type(value)))  # described where named_modules reaches it
    if isinstance(value, type):
        return ("class", _qualname(value))
    if callable(value) and not hasattr(value, "__dict__") or inspect.isfunction(value) or inspect.ismethod(value):
        return ("callable", _qualname(value))
    if depth <= 0 or id(value) in seen:
        return ("object", _qualname(type(value)))
    seen = seen | {id(value)}
    if isinstance(value, Mapping):
        items = ((repr(k), _plain(v, depth - 1, seen)) for k, v in value.items() if k not in _PROVENANCE_KEYS)
        return ("map", tuple(sorted(items)))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, depth - 1, seen) for v in value]
        return (type(value).__name__, tuple(sorted(map(repr, items)) if isinstance(value, (set, frozenset)) else items))
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return ("config", _qualname(type(value)), _plain(to_dict(), depth + 2, seen))
        except Exception:  # a to_dict that fails: describe the object by its attributes instead
            pass
    if hasattr(value, "__dict__"):
        return ("object", _qualname(type(value)), _plain(vars(value), depth - 1, seen))
    return ("object", _qualname(type(value)), repr(value) if type(value).__repr__ is not object.__repr__ else "")


# -- entries ---------------------------------------------------------------------------------------
class _NodeRef:
    """A graph node named in an entry, resolved when the graph is rebuilt."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Pickler(pickle.Pickler):
    """Writes nodes by name, ops by their registered name, meta tensors as metadata and storage ids."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.storages: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.fx.Node):
            return ("node", obj.name)
        if isinstance(obj, torch._ops.OpOverload):
            return ("op", obj._schema.name, obj._overloadname)
        if isinstance(obj, torch._ops.HigherOrderOperator):
            return ("hop", obj.name())
        if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
            storage = obj.untyped_storage()
            index = self.storages.setdefault(storage._cdata, len(self.storages))
            return ("meta", index, storage.nbytes(), tuple(obj.shape), obj.stride(), obj.storage_offset(),
                    obj.dtype, obj.requires_grad)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[int, torch.UntypedStorage] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "node":
            return _NodeRef(pid[1])
        if kind == "op":
            namespace, name = pid[1].split("::")
            packet = getattr(getattr(torch.ops, namespace), name)
            return getattr(packet, pid[2] or "default")
        if kind == "hop":
            return getattr(torch.ops.higher_order, pid[1])
        if kind == "meta":
            _, index, nbytes, shape, stride, offset, dtype, requires_grad = pid
            if index not in self.storages:
                self.storages[index] = torch.empty(nbytes, dtype=torch.uint8, device=_META).untyped_storage()
            t = torch.empty(0, dtype=dtype, device=_META).set_(self.storages[index], offset, shape, stride)
            return t.requires_grad_(requires_grad) if requires_grad else t
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")


def _encode(captured: Captured, model: torch.nn.Module) -> dict[str, Any]:
    originals = dict(model.named_parameters(remove_duplicate=False))
    originals.update(model.named_buffers(remove_duplicate=False))
    nodes = [
        (n.op, n.name, n.target, n.args, n.kwargs, {k: n.meta[k] for k in _KEPT_META if k in n.meta})
        for n in captured.graph_module.graph.nodes
    ]
    # The model's own tensors are bound again at load: an entry holds no weights, only constants.
    bound = {w.name: w.kind != "constant" and w.name in originals for w in captured.weights}
    return {
        "nodes": nodes,
        "weights": [(dataclasses.replace(w, value=None), bound[w.name]) for w in captured.weights],
        "in_spec": captured.in_spec,
        "out_spec": captured.out_spec,
        "device": str(captured.device),
        "input_objects": captured.input_objects,
        "constants": {w.name: w.value for w in captured.weights if not bound[w.name]},
    }


def _decode(entry: dict[str, Any], model: torch.nn.Module) -> Captured:
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}

    def resolve(a: Any) -> Any:
        return env[a.name] if isinstance(a, _NodeRef) else a

    for op, name, target, args, kwargs, meta in entry["nodes"]:
        args = torch.fx.node.map_aggregate(args, resolve)
        kwargs = torch.fx.node.map_aggregate(kwargs, resolve)
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:  # a name fx avoids (a builtin's, ``input``) that export gave: keep it
            if name in env:
                raise ValueError(f"node name {name!r} appears twice")
            node.name = name
            graph._graph_namespace._rename_object(node, name)
        node.meta.update(meta)
        env[name] = node
    originals = dict(model.named_parameters(remove_duplicate=False))
    originals.update(model.named_buffers(remove_duplicate=False))
    weights = []
    for spec, bound in entry["weights"]:
        if bound:
            original = originals[spec.name]
            value = None if original.device == _META else original.detach()
            spec = dataclasses.replace(spec, value=value, requires_grad=original.requires_grad)
        else:
            spec = dataclasses.replace(spec, value=entry["constants"][spec.name])
        weights.append(spec)
    return Captured(
        graph_module=torch.fx.GraphModule(torch.nn.Module(), graph),
        weights=tuple(weights),
        in_spec=entry["in_spec"],
        out_spec=entry["out_spec"],
        device=torch.device(entry["device"]),
        input_objects=entry["input_objects"],
    )


def _load(path: Path, key: str, model: torch.nn.Module) -> Captured | None:
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not a vramfx capture entry")
            with warnings.catch_warnings():  # torch warns about the pickled form of its own tree specs
                warnings.simplefilter("ignore", FutureWarning)
                stored_key, entry = _Unpickler(f).load()
        if stored_key != key:
            raise ValueError("the entry's key differs from its file name")
        return _decode(entry, model)
    except FileNotFoundError:
        return None
    except Exception as exc:  # any unreadable entry is a miss; capture writes a good one over it
        log.debug("vramfx: ignoring unreadable capture cache entry %s: %s: %s", path, type(exc).__name__, exc)
        return None


def _store(path: Path, key: str, captured: Captured, model: torch.nn.Module) -> None:
    if any(n.op in ("get_attr", "call_module") for n in captured.graph_module.graph.nodes):
        log.debug("vramfx: capture of %s not cached: its graph holds submodules", type(model).__name__)
        return
    try:
        write_atomically(path, lambda f: (f.write(_MAGIC), _Pickler(f).dump((key, _encode(captured, model)))))
    except Exception as exc:  # a cache that cannot be written costs the next process a capture, nothing else
        log.debug("vramfx: capture of %s not cached: %s: %s", type(model).__name__, type(exc).__name__, exc)


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file renamed into place: readers
    see the old entry or the whole new one, and concurrent writers leave one whole entry."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
