"""CompiledModule: the model, run through planned graphs, cached per input signature.

It behaves like the wrapped model where the ecosystem looks (call signature, output structure,
``.config``/``.dtype``/``.device``), so pipelines take it in the model's place.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx import carried
from vramfx.capture import Captured, refuse_if_forked_mid_capture
from vramfx.errors import CaptureError, RuntimeFailure
from vramfx.forks import renew_after_fork
from vramfx.model_state import changed, snapshot
from vramfx.plan.plan import Plan
from vramfx.runtime.engine import Engine, ResidentStore, single_threaded_after_fork
from vramfx.util import format_bytes

MAX_SIGNATURES_BEFORE_WARNING = 8

log = logging.getLogger(__name__)


@dataclass
class CompiledGraph:
    """Everything built for one input signature.

    ``graph_bytes`` is the host memory this graph holds outside its plan; ``reserved_bytes``
    what its plan set aside for every graph the compiled model held when it was planned.
    ``adapters`` keeps its adapter values current (:class:`vramfx.adapters.binding.AdapterBinding`).
    """

    captured: Captured
    plan: Plan
    graph_module: torch.fx.GraphModule
    engine: Engine
    graph_bytes: int = 0
    reserved_bytes: int = 0
    adapters: Any = None

    @functools.cached_property
    def carries(self) -> bool:
        """Whether calls pass or return objects carried as their tensors (a cache)."""
        return self.captured.input_objects > 0 or carried.carries(self.captured.out_spec)


@dataclass(frozen=True)
class Fallback:
    """An input signature export cannot express: its calls run module by module."""

    reason: CaptureError


def input_signature(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """What a captured graph is specialised on: structure, tensor metadata, non-tensor values.

    Floats are keyed by ``repr``: ``nan`` keys like ``nan`` (it never equals itself) and ``-0.0``
    apart from ``0.0`` (they are equal, yet a graph specialised on one is wrong for the other).
    """
    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device)))
        elif isinstance(leaf, (float, complex)):
            key.append(("value", type(leaf).__qualname__, repr(leaf)))
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
    under the same budget). A call whose input signature export cannot express takes it, after
    one warning naming the cause; other signatures keep their graphs. ``generate`` always takes
    it. An error the model raises on a call (eager raises it too) is raised as it is, and
    nothing is cached or switched.

    It is inference state bound to its device, dtype and weights: ``.to``, ``.half()``,
    ``.cuda()`` and the like accept only what it was compiled for, ``state_dict()`` reads the
    stored weights, and copying, pickling, ``load_state_dict`` and training are refused with
    what to do instead. In a process forked from one that used it, its locks and reader threads
    are made anew (a CUDA model refuses with a clear error instead).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        build: Callable[[tuple, dict[str, Any], ResidentStore, int], CompiledGraph],
        module_path: Callable[[], Any] | None = None,
        dtype: torch.dtype | None = None,
        stored_state: Callable[[], dict[str, torch.Tensor]] | None = None,
        replan: Callable[[Captured, ResidentStore, int, int], CompiledGraph] | None = None,
        adapter_state: Callable[[], Any] | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        # Not super().__init__(): in a class made by vramfx.compiled_class the next class in the
        # MRO is the model's own, whose __init__ builds a model.
        torch.nn.Module.__init__(self)
        self.__dict__["_vramfx_adapter_state"] = adapter_state
        self.__dict__["_vramfx_budget_bytes"] = budget_bytes
        self.__dict__["_vramfx_dtype"] = dtype
        self.__dict__["_vramfx_model"] = model
        self.__dict__["_vramfx_device"] = device
        self.__dict__["_vramfx_build"] = build
        self.__dict__["_vramfx_replan"] = replan
        self.__dict__["_vramfx_cache"] = {}
        self.__dict__["_vramfx_active"] = None
        self.__dict__["_vramfx_latest"] = None
        self.__dict__["_vramfx_lock"] = threading.Lock()
        self.__dict__["_vramfx_store"] = ResidentStore()
        self.__dict__["_vramfx_warned"] = False
        self.__dict__["_vramfx_make_module_path"] = module_path
        self.__dict__["_vramfx_module_path"] = None
        self.__dict__["_vramfx_warned_fallback"] = False
        self.__dict__["_vramfx_stored_state"] = stored_state
        self.__dict__["_vramfx_snapshot"] = snapshot(model)
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # A call another thread was making when the parent forked holds the lock forever here.
        self.__dict__["_vramfx_lock"] = threading.Lock()
        single_threaded_after_fork()

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

    def named_children(self) -> Any:
        """The model's submodules: methods that walk the module tree (setting attention
        processors, counting parameters) walk the model's."""
        return self.model.named_children()

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
        """This module, then the model's submodules under their names in the model."""
        memo = set() if memo is None else memo
        memo.add(self)
        yield prefix, self
        for name, module in self.model.named_modules(memo=memo, prefix=prefix, remove_duplicate=remove_duplicate):
            if module is not self.model:
                yield name, module

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        """The model's parameters (meta where the checkpoint holds them)."""
        return self.model.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        return self.model.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def __repr__(self) -> str:
        name = type(self.model).__name__
        budget = self.__dict__.get("_vramfx_budget_bytes")
        parts = [f"budget={format_bytes(budget)}" if budget is not None else None, f"device={self.device}"]
        graphs = self.compiled_graphs
        if graphs:
            plan = graphs[-1].plan
            parts.append(
                f"{len(graphs)} graph(s), plan: peak {format_bytes(plan.peak_bytes)}, "
                f"{format_bytes(plan.streamed_bytes)} streamed per call"
            )
        else:
            parts.append("not captured yet")
        if self.module_path is not None:
            parts.append("module path in use")
        return f"Compiled[{name}](" + ", ".join(p for p in parts if p) + ")"

    @property
    def compiled_graphs(self) -> tuple[CompiledGraph, ...]:
        return tuple(e for e in self.__dict__["_vramfx_cache"].values() if isinstance(e, CompiledGraph))

    # -- the nn.Module surface: what the method means, or a clear refusal ------------------
    def to(self, *args: Any, **kwargs: Any) -> "CompiledModule":
        """Moving a compiled model is a no-op to its own device and dtype; anything else is an error."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and _same_device(torch.device(device), self.device) is False:
            raise ValueError(
                f"this model was compiled for {self.device}; compile it again with "
                f"device={str(device)!r} instead of moving it"
            )
        if dtype is not None and dtype != self.dtype:
            name = str(dtype).removeprefix("torch.")
            raise ValueError(
                f"this model was compiled for {self.dtype}; compile it again with compute_dtype=torch.{name} "
                "(and inputs in it) instead of casting it"
            )
        return self

    def cuda(self, device: int | torch.device | None = None) -> "CompiledModule":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> "CompiledModule":
        return self.to("cpu")

    def half(self) -> "CompiledModule":
        return self.to(torch.float16)

    def bfloat16(self) -> "CompiledModule":
        return self.to(torch.bfloat16)

    def float(self) -> "CompiledModule":
        return self.to(torch.float32)

    def double(self) -> "CompiledModule":
        return self.to(torch.float64)

    def type(self, dst_type: torch.dtype | str) -> "CompiledModule":
        return self.to(dst_type if isinstance(dst_type, torch.dtype) else getattr(torch, str(dst_type).split(".")[-1]))

    def _apply(self, fn: Callable, recurse: bool = True) -> "CompiledModule":
        raise TypeError(
            "a CompiledModule's weights live in its weights source and its arena, not in tensors this "
            "method could convert; compile the model again with the device / compute_dtype you want"
        )

    def train(self, mode: bool = True) -> "CompiledModule":
        """Inference only: ``train(False)`` (``eval()``) is accepted, training is refused."""
        if mode:
            raise TypeError(
                "a CompiledModule runs inference only (calls run without grad, in eval mode); "
                "train the original model instead"
            )
        return super().train(False)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The model's weights, read from where they are stored into host memory (the model's
        size), each floating-point tensor in the dtype it computes in.

        Raises
        ------
        WeightsError
            A weight the model needs is missing from its weights source.
        """
        if args:
            raise TypeError("state_dict() takes keyword arguments only (destination=, prefix=, keep_vars=)")
        read = self.__dict__["_vramfx_stored_state"]
        if read is None:
            raise TypeError("this CompiledModule was made without access to its weights; use the original model's")
        out = destination if destination is not None else collections.OrderedDict()
        for name, tensor in read().items():
            out[prefix + name] = tensor
        return out

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "a compiled model's weights are read from the weights it was compiled with, and its plans "
            "depend on them; to run other weights, compile again with weights=<the new DiskMap or state dict>"
        )

    def __deepcopy__(self, memo: dict) -> "CompiledModule":
        raise TypeError(
            "a CompiledModule cannot be copied: it holds reader threads, device memory and open weight "
            "files. Compile the model again (vramfx.compile(fast.model, ...)) for a second one"
        )

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a CompiledModule cannot be pickled: it holds reader threads, device memory and open weight "
            "files. Pickle what you compiled from (the model, a DiskMap) and call vramfx.compile where it "
            "is unpickled"
        )

    @property
    def module_path(self) -> Any:
        """The module-level path, once a fallback or ``generate`` made it; else None."""
        return self.__dict__["_vramfx_module_path"]

    def release(self, *, keep_resident: bool = False) -> None:
        """Free the arena and resident weights; the next call loads them again. With
        ``keep_resident``, the active plan's resident weights stay for the next call."""
        with self.__dict__["_vramfx_lock"]:
            self._release_graphs(keep_resident=keep_resident)
            self._release_module_path()

    def replan(self) -> None:
        """Plan every captured input signature again, keeping its capture: for when what the
        budget must leave to others changed (the ``replan`` function given reads it). All or
        nothing: a BudgetError leaves every plan as it was."""
        replan = self.__dict__["_vramfx_replan"]
        if replan is None:
            return
        with self.__dict__["_vramfx_lock"]:
            cache: dict = self.__dict__["_vramfx_cache"]
            graphs = {k: e for k, e in cache.items() if isinstance(e, CompiledGraph)}
            total = self._graph_bytes()
            store = self.__dict__["_vramfx_store"]
            fresh = {k: replan(e.captured, store, total - e.graph_bytes, e.graph_bytes) for k, e in graphs.items()}
            self._release_graphs()
            self._release_module_path()
            self.__dict__["_vramfx_module_path"] = None  # made again, with the new margin, on its next call
            latest = self.__dict__["_vramfx_latest"]
            for key, entry in fresh.items():
                if graphs[key] is latest:
                    self.__dict__["_vramfx_latest"] = entry
            cache.update(fresh)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``generate`` (transformers), its calls on captured graphs.

        Without a cache chosen by the caller, a static KV cache keeps shapes fixed across
        decoding steps, so the prompt runs on one captured graph and every step on another
        (:mod:`vramfx.generation`). Tokens equal eager's with the same cache. A model transformers
        cannot give a static cache runs each step with the cache it would use; a step export
        cannot express runs module by module, after one warning.
        """
        model_class = type(self.model)
        if not callable(getattr(model_class, "generate", None)):
            raise AttributeError(f"{model_class.__name__} has no generate()")
        if not isinstance(self, model_class):
            # A CompiledModule not made by compile: only the module path can run the model's generate.
            with self.__dict__["_vramfx_lock"]:
                return self._enter_module_path().generate(*args, **kwargs)
        from vramfx.generation import generate_on_graphs

        return generate_on_graphs(self, model_class, *args, **kwargs)

    # -- calling ---------------------------------------------------------------------------
    def prepare(self, args: tuple, kwargs: Mapping[str, Any]) -> CompiledGraph | None:
        """Capture and plan for this call's signature now (compile's ``example_args``).

        Returns None when export cannot express this signature and its calls take the
        module-level path.
        """
        with self.__dict__["_vramfx_lock"]:
            self._follow_model_changes()
            try:
                call = carried.lift((tuple(args), canonical_kwargs(kwargs)))
            except CaptureError as exc:
                self._fall_back(exc, stacklevel=5)
                return None
            entry = self._entry_for(call.tree, self._adapters(), stacklevel=5)
            return entry if isinstance(entry, CompiledGraph) else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        refuse_if_forked_mid_capture()
        kwargs = canonical_kwargs(kwargs)
        with self.__dict__["_vramfx_lock"], torch.no_grad():
            self._follow_model_changes()
            try:
                call = carried.lift((args, kwargs))
            except CaptureError as exc:  # an object in the call that cannot be carried
                entry: CompiledGraph | Fallback = self._fall_back(exc, stacklevel=6)
            else:
                self._check_devices(pytree.tree_leaves(call.tree))
                adapters = self._adapters()
                entry = self._entry_for(call.tree, adapters, stacklevel=6)
            if isinstance(entry, Fallback):
                return self._enter_module_path()(*args, **kwargs)
            self._release_module_path()
            if entry.adapters is not None:
                entry.adapters.refresh(adapters, entry.engine)
            self._activate(entry)
            engine = entry.engine
            engine.begin_call()
            try:
                flat = entry.graph_module(engine, *pytree.tree_leaves(call.tree))
                engine.end_call()
            except Exception as exc:
                engine.abort()
                raise _with_node(exc, entry.graph_module) from None
            result = pytree.tree_unflatten(list(flat), entry.captured.out_spec)
            if not entry.carries:
                return result
            return carried.settle(result, call.objects, self.device, states=entry.captured.input_objects > 0)

    def _follow_model_changes(self) -> None:
        """Drop every graph and the module path when the model changed since they were made
        (:mod:`vramfx.model_state`): the next call captures the model as it is now."""
        now = snapshot(self.model)
        what = changed(self.__dict__["_vramfx_snapshot"], now)
        if what is None:
            return
        cache: dict = self.__dict__["_vramfx_cache"]
        if cache or self.__dict__["_vramfx_module_path"] is not None:
            log.info("%s changed since it was captured (%s): capturing it again", type(self.model).__name__, what)
        self._release_graphs()
        self._release_module_path()
        cache.clear()
        self.__dict__["_vramfx_latest"] = None
        self.__dict__["_vramfx_module_path"] = None
        self.__dict__["_vramfx_snapshot"] = now

    def _adapters(self) -> Any:
        """The model's adapter state now (:func:`vramfx.adapters.state.adapter_state`), or None."""
        read = self.__dict__["_vramfx_adapter_state"]
        return read() if read is not None else None

    def _entry_for(self, tree: tuple, adapters: Any, *, stacklevel: int) -> CompiledGraph | Fallback:
        """The graph for this signature and adapter structure, built on first use; a Fallback for
        a signature export cannot express (when a module path exists). Any other error
        propagates, caching nothing."""
        cache: dict = self.__dict__["_vramfx_cache"]
        key = input_signature(*tree)
        if adapters is not None:  # adapter values are refreshed per call; their structure is captured
            key = (key, adapters.structure)
        entry = cache.get(key)
        if isinstance(entry, CompiledGraph) and entry.reserved_bytes < self._graph_bytes():
            cache[key] = entry = self._replanned(entry)
        if entry is None:
            try:
                entry = self.__dict__["_vramfx_build"](*tree, self.__dict__["_vramfx_store"], self._graph_bytes())
            except CaptureError as exc:
                entry = self._fall_back(exc, stacklevel=stacklevel + 1)
            cache[key] = entry
            if len(cache) > MAX_SIGNATURES_BEFORE_WARNING and not self.__dict__["_vramfx_warned"]:
                self.__dict__["_vramfx_warned"] = True
                warnings.warn(
                    f"{type(self.model).__name__} has been captured for {len(cache)} different input "
                    "signatures (shapes, dtypes, structure, non-tensor values or adapter structures); each one is "
                    "exported and planned anew. Keep input shapes fixed, or pad them to a few sizes.",
                    stacklevel=stacklevel,
                )
        if isinstance(entry, CompiledGraph):
            self.__dict__["_vramfx_latest"] = entry
        return entry

    def _graph_bytes(self) -> int:
        """Host memory the compiled graphs held now keep outside their plans."""
        return sum(e.graph_bytes for e in self.__dict__["_vramfx_cache"].values() if isinstance(e, CompiledGraph))

    def _replanned(self, entry: CompiledGraph) -> CompiledGraph:
        """``entry`` planned again, setting aside graphs captured since it was planned (its
        capture is kept). Raises BudgetError when the budget cannot hold them all."""
        replan = self.__dict__["_vramfx_replan"]
        if replan is None:
            return entry
        if self.__dict__["_vramfx_active"] is entry:
            entry.engine.deactivate()
            self.__dict__["_vramfx_active"] = None
        held = self._graph_bytes() - entry.graph_bytes
        return replan(entry.captured, self.__dict__["_vramfx_store"], held, entry.graph_bytes)

    def _fall_back(self, exc: CaptureError, *, stacklevel: int) -> Fallback:
        """This signature runs module by module; one warning per compiled model names the cause."""
        if self.__dict__["_vramfx_make_module_path"] is None:
            raise exc
        message = (
            f"vramfx.compile: {exc}. Calls with this input signature run {type(self.model).__name__} module "
            "by module instead (the layer-swap path, under the same budget): same outputs, slower calls. "
            "Other input signatures keep their compiled graphs."
        )
        if self.__dict__["_vramfx_warned_fallback"]:
            log.info("%s", message)
        else:
            self.__dict__["_vramfx_warned_fallback"] = True
            warnings.warn(message, stacklevel=stacklevel)
        return Fallback(exc)

    def _enter_module_path(self) -> Any:
        """The module-level path, made on first use and again after the model's adapters changed
        (its units are the model's parameters when it was made); the graphs' memory is freed for it."""
        self._release_graphs()
        path = self.__dict__["_vramfx_module_path"]
        adapters = self._adapters()
        # Its units hold the adapter tensors the model held when it was made.
        held = (adapters.structure, tuple(map(id, adapters.tensors.values()))) if adapters is not None else None
        if path is not None and self.__dict__.get("_vramfx_module_path_adapters") != held:
            path.release()
            path = None
        elif path is not None and adapters is not None and self.device.type != "cpu":
            path.release()  # its copies on the device would miss adapter values written in place
        self.__dict__["_vramfx_module_path_adapters"] = held
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

    def _release_graphs(self, *, keep_resident: bool = False) -> None:
        active = self.__dict__["_vramfx_active"]
        if active is not None:
            active.engine.deactivate()
        self.__dict__["_vramfx_active"] = None
        if not keep_resident:
            self.__dict__["_vramfx_store"].clear()

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

