"""Capture a stack of identical blocks by tracing one of them: a faster first capture.

Diffusion transformers and LLMs are a ``ModuleList`` of N blocks that are the same class, the
same configuration and the same parameter shapes, each called once with inputs of the same
signature. ``torch.export`` traces every one of them, which is most of a first capture's time.
Here the model is exported with each such block as one opaque call, the first block is exported
alone on the inputs it received, and a copy of its graph, with its parameters rebound to each
sibling's placeholders, replaces each call. The graph is what a whole-model export gives: the
same aten ops on the same values in the same order, only node names differ.

Whenever the reuse is not shown valid the model is exported whole (logged at debug level):
blocks that differ in class, attributes or parameters; hooks on a block or global ones; a block
called more than once or not at all; siblings called with too many input signatures, or under
another grad, autocast or dtype state than their export; a block whose export lifts constants,
holds submodules, mutates its inputs or returns something other than tensors; any error on the
way.
``VRAMFX_BLOCK_CAPTURE=0`` turns the reuse off.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import operator
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

ENV_SWITCH = "VRAMFX_BLOCK_CAPTURE"
#: Fewer siblings than this are exported as they are: the reuse saves nothing.
MIN_BLOCKS = 2
_META = torch.device("meta")
_PLAIN_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class NotReusable(Exception):
    """The blocks cannot be captured once for all: the model is exported whole."""


def block_capture_enabled() -> bool:
    """Whether repeated blocks are captured once (not ``VRAMFX_BLOCK_CAPTURE=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class _Tensor:
    """A tensor input's metadata: what an export of the block is specialised on."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Tensor:
        return _Tensor(tuple(t.shape), tuple(t.stride()), t.dtype)

    def meta(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=_META)


@dataclass(frozen=True)
class _Signature:
    """A call's ``(args, kwargs)``: its structure, tensors as metadata, other leaves as values."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]

    @staticmethod
    def of(args: tuple, kwargs: Mapping[str, Any]) -> _Signature:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        out = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if type(leaf) not in (torch.Tensor, torch.nn.Parameter) and not _is_fake(leaf):
                    raise NotReusable(f"a block input is a {type(leaf).__name__}")
                out.append(_Tensor.of(leaf))
            elif isinstance(leaf, _PLAIN_LEAVES):
                out.append((type(leaf), leaf))
            else:
                raise NotReusable(f"a block input is a {type(leaf).__name__}, not a tensor or a plain value")
        return _Signature(spec, tuple(out))

    def example(self) -> tuple[tuple, dict[str, Any]]:
        leaves = [leaf.meta() if isinstance(leaf, _Tensor) else leaf[1] for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@dataclass
class _Variant:
    """One export of a block, for the siblings called with ``signature``."""

    signature: _Signature
    block: torch.nn.Module
    exported: torch.export.ExportedProgram | None = None
    outputs: tuple[_Tensor, ...] = ()
    out_spec: pytree.TreeSpec | None = None
    state: tuple | None = None


def _global_state() -> tuple:
    """The process state that changes what a block traces to besides its inputs: grad and
    inference mode, autocast on each device type, the default dtype, deterministic algorithms.
    A model that sets one around its blocks gets them exported under it, or whole."""
    autocast = tuple(
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
    )
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


@dataclass
class _Group:
    """Identical siblings, captured from one export of a block per input signature they are
    called with (Flux's single blocks: the first one's input is contiguous, the others' a slice)."""

    prefix: str
    blocks: list[torch.nn.Module]
    variants: list[_Variant] = field(default_factory=list)

    def variant(self, signature: _Signature) -> int:
        for index, variant in enumerate(self.variants):
            if variant.signature == signature:
                return index
        raise NotReusable(f"blocks under {self.prefix!r} are called with another input signature under export")


# -- the opaque call -------------------------------------------------------------------------------
# The op only ever lives in a graph being spliced: its fake kernel gives the block's outputs'
# metadata from the session's own export of the first block; it is never run.
_sessions: dict[int, list[_Group]] = {}
_session_ids = itertools.count()
_sessions_lock = threading.Lock()


@torch.library.custom_op("vramfx::block_call", mutates_args=())
def block_call(session: int, group: int, variant: int, block: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A block's call, kept whole in the model's export; replaced by the block's graph."""
    raise RuntimeError("vramfx::block_call is a capture placeholder and is never run")


@block_call.register_fake
def _block_call_fake(session: int, group: int, variant: int, block: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = _sessions[session][group].variants[variant].outputs
    return [torch.empty_strided(o.shape, o.stride, dtype=o.dtype, device=_META) for o in outputs]


# -- finding the blocks ----------------------------------------------------------------------------
def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """Every ``ModuleList``/``Sequential`` of at least :data:`MIN_BLOCKS` children that are the
    same class with the same attributes, parameters and buffers (names, shapes, strides, dtypes)."""
    from vramfx.capture_cache import block_digest

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) < MIN_BLOCKS:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or isinstance(children[0], (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        if len({id(c) for c in children}) != len(children):
            continue
        digests = {block_digest(c) for c in children}
        if len(digests) == 1:
            found.append((name, children))
        else:
            log.debug("vramfx: blocks under %r differ in attributes or parameters: captured one by one", name)
    return found


# -- the export ------------------------------------------------------------------------------------
def export_reusing_blocks(
    model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, kwargs, strict=False)``, with each stack of identical
    blocks traced once (module doc); the whole model traced when the reuse is not shown valid.

    Runs inside capture's state: meta parameters, ``no_grad``, eval mode.
    """
    if block_capture_enabled():
        try:
            return _export_with_blocks(model, args, kwargs)
        except NotReusable as exc:
            log.debug("vramfx: %s captured whole: %s", type(model).__name__, exc)
        except Exception as exc:  # any failure of the shortcut: the whole export decides (and raises as it should)
            log.debug("vramfx: %s captured whole after %s: %s", type(model).__name__, type(exc).__name__, exc)
    return torch.export.export(model, args, kwargs, strict=False)


def _export_with_blocks(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.export.ExportedProgram:
    from vramfx.capture_cache import uncacheable_reason

    groups = [_Group(prefix, blocks) for prefix, blocks in repeated_blocks(model)]
    if not groups:
        raise NotReusable("no repeated blocks")
    for group in groups:
        for position, block in enumerate(group.blocks):
            reason = uncacheable_reason(block)  # hooks (a block's or global), adapters, a forward of its own
            if reason:
                raise NotReusable(f"block {group.prefix}.{position}: {reason}")
    groups = _record_calls(model, args, kwargs, groups)
    if not groups:
        raise NotReusable("no repeated blocks are called alike")
    for group in groups:
        for variant in group.variants:
            _export_block(variant)
    with _sessions_lock:
        session = next(_session_ids)
        _sessions[session] = groups
    try:
        with _opaque(groups, session):
            exported = torch.export.export(model, args, kwargs, strict=False)
    finally:
        with _sessions_lock:
            del _sessions[session]
    _splice(exported, groups)
    return exported


def _record_calls(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], groups: list[_Group]) -> list[_Group]:
    """Run the model eagerly on meta tensors, recording the input signatures each group's blocks
    are called with; the groups whose blocks are each called once, with few signatures.

    Only the first block of each signature runs: the others return new meta tensors shaped as
    its outputs (the same block on the same signature), so the run costs about one block per
    signature besides the rest of the model.
    """
    calls: dict[int, int] = {}
    refused: dict[int, str] = {}
    outputs: dict[tuple[int, _Signature], tuple[list[Any], pytree.TreeSpec]] = {}
    patched = []

    def forward(index: int, block: torch.nn.Module, original: Any, a: tuple, kw: dict) -> Any:
        calls[id(block)] = calls.get(id(block), 0) + 1
        if index in refused:
            return original(*a, **kw)
        try:
            signature = _Signature.of(a, kw)
        except NotReusable as exc:
            refused[index] = str(exc)
            return original(*a, **kw)
        if (index, signature) in outputs:
            leaves, spec = outputs[index, signature]
            return pytree.tree_unflatten([x.meta() if isinstance(x, _Tensor) else x for x in leaves], spec)
        groups[index].variants.append(_Variant(signature, block))
        out = original(*a, **kw)
        leaves, spec = pytree.tree_flatten(out)
        if all(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in leaves):
            outputs[index, signature] = ([_Tensor.of(x) for x in leaves], spec)
        else:
            refused[index] = "a block returns something other than meta tensors"
        return out

    try:
        for index, group in enumerate(groups):
            for block in group.blocks:
                original = block.forward
                block.forward = functools.partial(_call_with, forward, index, block, original)
                patched.append(block)
        model(*args, **kwargs)
    finally:
        for block in patched:
            del block.forward
    kept = []
    for index, group in enumerate(groups):
        if index in refused:
            reason = refused[index]
        elif {calls.get(id(b), 0) for b in group.blocks} != {1}:
            reason = "they are not each called once"
        elif len(group.variants) > len(group.blocks) // MIN_BLOCKS:
            reason = f"they are called with {len(group.variants)} input signatures"
        else:
            kept.append(group)
            continue
        log.debug("vramfx: blocks under %r captured one by one: %s", group.prefix, reason)
    return kept


def _call_with(forward: Any, index: int, block: torch.nn.Module, original: Any, *a: Any, **kw: Any) -> Any:
    return forward(index, block, original, a, kw)


def _export_block(variant: _Variant) -> None:
    block_args, block_kwargs = variant.signature.example()
    states = []
    handle = variant.block.register_forward_pre_hook(lambda module, a: states.append(_global_state()))
    try:
        exported = torch.export.export(variant.block, block_args, block_kwargs, strict=False)
    finally:
        handle.remove()
    if len(states) != 1:
        raise NotReusable("the block's export did not call it once")
    variant.state = states[0]
    if any(n.op in ("get_attr", "call_module") for n in exported.graph_module.graph.nodes):
        raise NotReusable("the block's graph holds submodules or attributes")
    sig = exported.graph_signature
    for spec in sig.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.USER_INPUT):
            raise NotReusable(f"the block's export lifts a {spec.kind.name} input")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT or not isinstance(spec.arg, TensorArgument):
            raise NotReusable(f"the block's export has a {spec.kind.name} output that is not one tensor")
    output = next(n for n in reversed(exported.graph_module.graph.nodes) if n.op == "output")
    values = [n.meta.get("val") for n in output.args[0]]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise NotReusable("the block returns no tensors or values without metadata")
    variant.exported = exported
    variant.outputs = tuple(_Tensor.of(v) for v in values)
    variant.out_spec = exported.call_spec.out_spec


@contextlib.contextmanager
def _opaque(groups: list[_Group], session: int) -> Iterator[None]:
    """Each block's forward becomes one ``vramfx::block_call`` of its tensor inputs."""
    patched = []
    called: set[int] = set()
    for index, group in enumerate(groups):
        for position, block in enumerate(group.blocks):
            def forward(*a: Any, _g: int = index, _b: int = position, _group: _Group = group, _m: Any = block,
                        **kw: Any) -> Any:
                if id(_m) in called:
                    raise NotReusable(f"block {_group.prefix}.{_b} is called twice")
                called.add(id(_m))
                v = _group.variant(_Signature.of(a, kw))
                if _global_state() != _group.variants[v].state:
                    raise NotReusable(f"block {_group.prefix}.{_b} is called under another grad, autocast or dtype state")
                tensors = [x for x in pytree.tree_leaves((a, kw)) if isinstance(x, torch.Tensor)]
                outputs = torch.ops.vramfx.block_call(session, _g, v, _b, tensors)
                return pytree.tree_unflatten(list(outputs), _group.variants[v].out_spec)

            block.forward = forward
            patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward


# -- the splice ------------------------------------------------------------------------------------
def _splice(exported: torch.export.ExportedProgram, groups: list[_Group]) -> None:
    """Replace each ``block_call`` by a copy of its group's block graph, bound to its block."""
    gm = exported.graph_module
    graph = gm.graph
    sig = exported.graph_signature
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    fqn_to_node = {fqn: by_name[ph] for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    op = torch.ops.vramfx.block_call.default
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is op]
    expected = sum(len(g.blocks) for g in groups)
    if len(calls) != expected:
        raise NotReusable(f"the model's export holds {len(calls)} block calls, not {expected}")
    for call in calls:
        _, group_index, variant, position, inputs = call.args
        group = groups[group_index]
        _inline(graph, call, group.variants[variant], f"{group.prefix}.{position}", fqn_to_node, list(inputs))
    graph.lint()  # capture recompiles the module once its passes are done


def _inline(
    graph: torch.fx.Graph,
    call: torch.fx.Node,
    variant: _Variant,
    path: str,
    fqn_to_node: Mapping[str, torch.fx.Node],
    inputs: list[torch.fx.Node],
) -> None:
    block_graph = variant.exported.graph_module.graph
    block_sig = variant.exported.graph_signature
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in block_graph.nodes if n.op == "placeholder"]
    user_inputs = iter(inputs)
    for node, spec in zip(placeholders, block_sig.input_specs, strict=True):
        if spec.kind == InputKind.USER_INPUT:
            if isinstance(spec.arg, TensorArgument):
                env[node] = next(user_inputs)
            elif node.users:
                raise NotReusable("the block's graph reads a non-tensor input")
        else:
            fqn = f"{path}.{spec.target}"
            if fqn not in fqn_to_node:
                raise NotReusable(f"the model's export has no placeholder for {fqn!r}")
            env[node] = fqn_to_node[fqn]
    if next(user_inputs, None) is not None:
        raise NotReusable("the block call passes more tensors than the block's graph takes")
    storages = _StorageMap()
    for node, target in env.items():
        storages.bind(node.meta["val"], target.meta["val"])
    stack = dict(call.meta.get("nn_module_stack") or {})
    outputs: list[torch.fx.Node] = []
    with graph.inserting_before(call):
        for node in block_graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = [env[a] for a in node.args[0]]
                continue
            copy = graph.node_copy(node, lambda a: env[a])
            copy.meta = dict(node.meta)
            if "val" in node.meta:
                copy.meta["val"] = storages.remap(node.meta["val"])
            copy.meta["nn_module_stack"] = _nested_stack(stack, node.meta.get("nn_module_stack") or {}, path)
            env[node] = copy
    for user in list(call.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise NotReusable("a block call's outputs are used other than one by one")
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(call)


def _nested_stack(outer: Mapping[str, Any], inner: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The module stack of a block node at ``path``: the call's stack, then the node's own
    modules inside the block with their paths made the model's."""
    stack = dict(outer)
    for key, (name, cls) in inner.items():
        if not name:
            continue
        stack[f"{path}.{key}"] = (f"{path}.{name}", cls)
    return stack


class _StorageMap:
    """Gives a copy's tensors the outer graph's storages: a block input's own (shifted by the
    outer value's offset), a fresh one per intermediate storage, so views and aliasing read as
    in a whole-model export."""

    def __init__(self) -> None:
        self._map: dict[int, tuple[torch.UntypedStorage, int]] = {}

    def bind(self, inner: Any, outer: Any) -> None:
        if not isinstance(inner, torch.Tensor) or not isinstance(outer, torch.Tensor):
            raise NotReusable("a block input has no tensor metadata")
        if (inner.shape, inner.stride(), inner.dtype) != (outer.shape, outer.stride(), outer.dtype):
            raise NotReusable("a block input's metadata differs between the block's export and the model's")
        key = inner.untyped_storage()._cdata
        target = (outer.untyped_storage(), outer.storage_offset() - inner.storage_offset())
        bound = self._map.setdefault(key, target)
        if bound is not target and (bound[0]._cdata, bound[1]) != (target[0]._cdata, target[1]):
            raise NotReusable("two block inputs share a storage in the block's export but not in the model's")

    def remap(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.remap(v) for v in value)
        if isinstance(value, dict):
            return {k: self.remap(v) for k, v in value.items()}
        return value

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self._map:
            fresh = torch.empty(t.untyped_storage().nbytes(), dtype=torch.uint8, device=_META).untyped_storage()
            self._map[key] = (fresh, 0)
        storage, shift = self._map[key]
        out = torch.empty(0, dtype=t.dtype, device=_META)
        out.set_(storage, t.storage_offset() + shift, t.shape, t.stride())
        return out
