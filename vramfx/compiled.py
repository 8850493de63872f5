"""CompiledModule: the model, run through planned graphs, cached per input signature.

It behaves like the wrapped model where the ecosystem looks (call signature, output structure,
``.config``/``.dtype``/``.device``), so pipelines take it in the model's place.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.capture import Captured
from vramfx.errors import CaptureError, RuntimeFailure
from vramfx.plan.plan import Plan
from vramfx.runtime.engine import Engine, ResidentStore

MAX_SIGNATURES_BEFORE_WARNING = 8


@dataclass
class CompiledGraph:
    """Everything built for one input signature."""

    captured: Captured
    plan: Plan
    graph_module: torch.fx.GraphModule
    engine: Engine


def input_signature(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """What a captured graph is specialised on: structure, tensor metadata, non-tensor values."""
    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                key.append(("value", type(leaf).__qualname__, leaf))
            except TypeError:
                key.append(("value", type(leaf).__qualname__, repr(leaf)))
    return (str(spec), tuple(key))


def canonical_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments in sorted order, so call order does not change the signature."""
    return {k: kwargs[k] for k in sorted(kwargs)}


class CompiledModule(torch.nn.Module):
    """A model compiled by :func:`vramfx.compile`. Call it like the model.

    Calls run without grad (inference only) and one at a time: a lock serialises concurrent
    calls from several threads. ``plan`` is the Plan of the most recent input signature.

    ``module_path`` makes the module-level path (the model run eagerly, module by module,
    under the same budget). Calls take it, after one warning naming the cause, once capture
    fails; ``generate`` always takes it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        build: Callable[[tuple, dict[str, Any]], CompiledGraph],
        module_path: Callable[[], Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["_vramfx_dtype"] = dtype
        self.__dict__["_vramfx_model"] = model
        self.__dict__["_vramfx_device"] = device
        self.__dict__["_vramfx_build"] = build
        self.__dict__["_vramfx_cache"] = {}
        self.__dict__["_vramfx_active"] = None
        self.__dict__["_vramfx_latest"] = None
        self.__dict__["_vramfx_lock"] = threading.Lock()
        self.__dict__["_vramfx_store"] = ResidentStore()
        self.__dict__["_vramfx_warned"] = False
        self.__dict__["_vramfx_make_module_path"] = module_path
        self.__dict__["_vramfx_module_path"] = None
        self.__dict__["_vramfx_fallback"] = None  # the CaptureError that sent calls down the module path

    # -- behaving like the model -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("_vramfx_model")
        if model is None:
            return super().__getattr__(name)
        return getattr(model, name)

    @property
    def device(self) -> torch.device:
        """The compute device (not the meta device the model's parameters may be on)."""
        return self.__dict__["_vramfx_device"]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype if one was compiled for, else the model's own."""
        if self.__dict__.get("_vramfx_dtype") is not None:
            return self.__dict__["_vramfx_dtype"]
        model = self.__dict__["_vramfx_model"]
        dtype = getattr(type(model), "dtype", None)
        if isinstance(dtype, property):
            return model.dtype
        return next((p.dtype for p in model.parameters()), torch.get_default_dtype())

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped model (its parameters may be meta)."""
        return self.__dict__["_vramfx_model"]

    @property
    def plan(self) -> Plan | None:
        """The Plan of the most recent input signature, or None before the first capture."""
        latest = self.__dict__["_vramfx_latest"]
        return latest.plan if latest is not None else None

    @property
    def compiled_graphs(self) -> tuple[CompiledGraph, ...]:
        return tuple(self.__dict__["_vramfx_cache"].values())

    def to(self, *args: Any, **kwargs: Any) -> "CompiledModule":
        """Moving a compiled model is a no-op to its own device; anything else is an error."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and _same_device(torch.device(device), self.device) is False:
            raise ValueError(
                f"this model was compiled for {self.device}; compile it again with "
                f"device={str(device)!r} instead of moving it"
            )
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"this model was compiled for {self.dtype}; compile it again to change dtype")
        return self

    @property
    def module_path(self) -> Any:
        """The module-level path, once a fallback or ``generate`` made it; else None."""
        return self.__dict__["_vramfx_module_path"]

    def release(self) -> None:
        """Free the arena and resident weights; the next call loads them again."""
        with self.__dict__["_vramfx_lock"]:
            self._release_graphs()
            self._release_module_path()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``generate`` (transformers), run on the module-level path.

        Decoding calls the model once per token with a growing KV cache: a new shape every
        step, which a captured graph would have to be exported and planned for each time.
        Instead nothing is captured: the prompt's call streams every module's weights
        synchronously and records the order modules run in; each later step fetches weights
        ahead along that order, under the same budget. Tokens equal eager's.
        """
        if not callable(getattr(type(self.model), "generate", None)):
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        with self.__dict__["_vramfx_lock"]:
            return self._enter_module_path().generate(*args, **kwargs)

    # -- calling ---------------------------------------------------------------------------
    def prepare(self, args: tuple, kwargs: Mapping[str, Any]) -> CompiledGraph | None:
        """Capture and plan for this call's signature now (compile's ``example_args``).

        Returns None when the model cannot be captured and calls take the module-level path.
        """
        with self.__dict__["_vramfx_lock"]:
            if self.__dict__["_vramfx_fallback"] is not None:
                return None
            return self._graph_or_fallback(tuple(args), canonical_kwargs(kwargs), stacklevel=5)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = canonical_kwargs(kwargs)
        with self.__dict__["_vramfx_lock"], torch.no_grad():
            leaves = pytree.tree_leaves((args, kwargs))
            self._check_devices(leaves)
            entry = None
            if self.__dict__["_vramfx_fallback"] is None:
                entry = self._graph_or_fallback(args, kwargs, stacklevel=6)
            if entry is None:
                return self._enter_module_path()(*args, **kwargs)
            self._release_module_path()
            self._activate(entry)
            engine = entry.engine
            engine.begin_call()
            try:
                flat = entry.graph_module(engine, *leaves)
                engine.end_call()
            except Exception as exc:
                engine.abort()
                raise _with_node(exc, entry.graph_module) from None
            return pytree.tree_unflatten(list(flat), entry.captured.out_spec)

    def _graph_or_fallback(self, args: tuple, kwargs: dict[str, Any], *, stacklevel: int) -> CompiledGraph | None:
        """The graph for this signature; None once capture failed and a module path exists."""
        try:
            return self._graph_for(args, kwargs)
        except CaptureError as exc:
            if self.__dict__["_vramfx_make_module_path"] is None:
                raise
            self.__dict__["_vramfx_fallback"] = exc
            warnings.warn(
                f"vramfx.compile: {exc}. Running {type(self.model).__name__} module by module instead "
                "(the layer-swap path, under the same budget): same outputs, slower calls.",
                stacklevel=stacklevel,
            )
            return None

    def _enter_module_path(self) -> Any:
        """The module-level path, made on first use; the graphs' memory is freed for it."""
        self._release_graphs()
        path = self.__dict__["_vramfx_module_path"]
        if path is None:
            make = self.__dict__["_vramfx_make_module_path"]
            if make is None:
                raise AttributeError("this CompiledModule has no module-level path")
            path = make()
            self.__dict__["_vramfx_module_path"] = path
        return path

    def _release_module_path(self) -> None:
        path = self.__dict__["_vramfx_module_path"]
        if path is not None:
            path.release()

    def _release_graphs(self) -> None:
        active = self.__dict__["_vramfx_active"]
        if active is not None:
            active.engine.deactivate()
        self.__dict__["_vramfx_active"] = None
        self.__dict__["_vramfx_store"].clear()

    def _graph_for(self, args: tuple, kwargs: dict[str, Any]) -> CompiledGraph:
        cache: dict = self.__dict__["_vramfx_cache"]
        key = input_signature(args, kwargs)
        entry = cache.get(key)
        if entry is None:
            entry = self.__dict__["_vramfx_build"](args, kwargs, self.__dict__["_vramfx_store"])
            cache[key] = entry
            if len(cache) > MAX_SIGNATURES_BEFORE_WARNING and not self.__dict__["_vramfx_warned"]:
                self.__dict__["_vramfx_warned"] = True
                warnings.warn(
                    f"{type(self.model).__name__} has been captured for {len(cache)} different input "
                    "signatures (shapes, dtypes, structure or non-tensor values); each one is "
                    "exported and planned anew. Keep input shapes fixed, or pad them to a few sizes.",
                    stacklevel=3,
                )
        self.__dict__["_vramfx_latest"] = entry
        return entry

    def _activate(self, entry: CompiledGraph) -> None:
        active = self.__dict__["_vramfx_active"]
        if active is not entry:
            if active is not None:
                active.engine.deactivate()
            self.__dict__["_vramfx_active"] = None
            entry.engine.activate()
            self.__dict__["_vramfx_active"] = entry
        else:
            entry.engine.activate()

    def _check_devices(self, leaves: list) -> None:
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and not _same_device(leaf.device, self.device):
                raise ValueError(
                    f"an input tensor of shape {tuple(leaf.shape)} is on {leaf.device}, but the model "
                    f"was compiled for {self.device}; move inputs with .to({str(self.device)!r}) or "
                    f"compile with device={str(leaf.device)!r}"
                )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True


def _with_node(exc: Exception, gm: torch.fx.GraphModule) -> Exception:
    """Name the graph node that raised, and the model code it came from."""
    node = _failing_node(exc.__traceback__, gm)
    if node is None:
        return exc
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    where = "\n".join(trace[-2:]) if trace else "(no model source recorded)"
    note = f"vramfx: raised by compiled graph node {node.format_node()}\nmodel code:\n{where}"
    if hasattr(exc, "add_note"):  # keeps the exception's type for callers that catch it
        exc.add_note(note)
        return exc
    return RuntimeFailure(f"{type(exc).__name__}: {exc}\n{note}")


def _failing_node(tb: TracebackType | None, gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    filename = getattr(gm.forward, "__code__", None)
    filename = filename.co_filename if filename is not None else None
    lineno_map = getattr(gm, "_lineno_map", None) or {}
    nodes = list(gm.graph.nodes)
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if filename is not None and code.co_filename == filename:
            # The map is keyed by line relative to the start of the generated ``forward``.
            index = lineno_map.get(tb.tb_lineno - code.co_firstlineno)
            if index is not None and 0 <= index < len(nodes):
                found = nodes[index]
        tb = tb.tb_next
    return found

