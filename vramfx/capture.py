"""Capture: the model and an example call → one fx graph with every weight as a placeholder.

The model is exported with *meta* parameters, buffers and inputs, so capture costs no memory
and runs no kernels. Non-strict ``torch.export`` lifts parameters, buffers and tensor constants
to graph placeholders — every weight use becomes a graph edge — and records the shape and dtype
of every intermediate in ``node.meta["val"]``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from vramfx import carried
from vramfx.adapters.scales import ScaleSlot, lift_scales, scales_as_buffers
from vramfx.capture_blocks import export_reusing_blocks
from vramfx.errors import CaptureError, VramfxError
from vramfx.fold_masks import fold_constant_masks
from vramfx.storage.checkpoint_keys import tensor_aliases

log = logging.getLogger(__name__)

_META = torch.device("meta")
_REASON_CHARS = 600


@dataclass(frozen=True)
class WeightSpec:
    """A tensor the graph reads that is not a user input.

    ``placeholders`` are the graph inputs that carry it: export lifts a tied tensor once per
    name, and all of them are this one weight, fetched once.

    ``kind`` is ``"parameter"``, ``"buffer"`` or ``"constant"``. ``aliases`` are every
    state-dict name of the same tensor (tied weights), ``name`` first. ``value`` is the real
    tensor when the module holds one (a real parameter or buffer, or a constant export lifted),
    else ``None``: then it must come from the weights mapping. ``requires_grad`` is the
    parameter's flag: torch picks kernels by it even under ``no_grad`` (``matmul`` folds a
    non-contiguous batch only for weights that do not require grad), so the runtime's copies
    carry it too. ``dtype`` is the graph's, which a compute dtype may make differ from
    ``value``'s.
    """

    name: str
    placeholders: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    persistent: bool
    aliases: tuple[str, ...]
    value: torch.Tensor | None
    requires_grad: bool = False


@dataclass(frozen=True)
class Captured:
    """The output of capture: a lifted graph and what its placeholders mean.

    The graph's placeholders are the weights (``weights``, in order) followed by the user
    inputs, one per leaf of ``(args, kwargs)`` lifted by :func:`vramfx.carried.lift` and
    flattened with ``in_spec``. The graph returns the flat user outputs, which ``out_spec``
    rebuilds into the model's output structure; with ``input_objects`` (objects the call passed,
    such as a cache), into ``(output, the state of each input object)``
    (:func:`vramfx.carried.settle` finishes both). ``adapter_scales`` are the LoRA scales the
    graph reads as attributes, to be filled before each call (:mod:`vramfx.adapters.scales`).
    """

    graph_module: torch.fx.GraphModule
    weights: tuple[WeightSpec, ...]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    device: torch.device
    input_objects: int = 0
    adapter_scales: tuple[ScaleSlot, ...] = ()

    @property
    def name_to_weight(self) -> dict[str, WeightSpec]:
        return {w.name: w for w in self.weights}


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Captured:
    """Export ``model(*args, **kwargs)`` on meta tensors into a graph for ``device``.

    Parameters
    ----------
    model:
        Any ``nn.Module``; its parameters may be meta. It is left exactly as it was.
    args, kwargs:
        An example call. Tensors may be real or meta; only their shapes, dtypes and strides
        matter. Non-tensor values are specialised into the graph.
    device:
        The compute device. Device constants the model creates during ``forward`` (traced as
        ``meta``) are retargeted to it.
    dtype:
        The compute dtype: floating-point parameters and buffers are captured in it, as after
        ``model.to(dtype)``, though the model is not touched. A weight's ``value`` keeps the
        module's own tensor, so its ``dtype`` may then differ from the value's.

    Returns
    -------
    Captured

    Raises
    ------
    CaptureError
        When ``torch.export`` cannot express the model as one graph: data-dependent control
        flow, an op with no meta kernel, a type it cannot flatten, a tensor made on another
        device than the inputs; the message carries export's reason, shortened.
    Exception
        Any other error the model's code raised on the example call (a wrong shape, a hook
        that raised) is raised as it is, with a note: eager raises it too.

    Examples
    --------
    >>> cap = capture(torch.nn.Linear(2, 3), (torch.randn(1, 2),))
    >>> [w.name for w in cap.weights]
    ['weight', 'bias']
    """
    device = torch.device(device)
    call = carried.lift((tuple(args), dict(kwargs or {})))
    meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, _to_meta, call.tree)
    refuse_if_forked_mid_capture()
    with scales_as_buffers(model) as scale_buffers:
        aliases = tensor_aliases(model)
        originals = _original_tensors(model)
        with _meta_state(model, dtype), _carrying(model, device), _exporting(), torch.no_grad():
            try:
                exported = export_reusing_blocks(model, meta_args, meta_kwargs)
            except Exception as exc:
                if not export_cannot_express(exc):
                    _add_note(exc, f"vramfx: raised by {type(model).__name__}'s code on this call while capturing "
                                   "it (on meta tensors); eager raises it too. Nothing was cached.")
                    raise
                raise CaptureError(_capture_reason(model, exc)) from exc

    gm = exported.graph_module
    _check_outputs(exported)
    _strip_non_user_outputs(gm, exported)
    _retarget_meta_devices(gm, device)
    weights = _weight_specs(exported, aliases, originals, model)
    _refuse_weight_writes(gm, {p: w.name for w in weights for p in w.placeholders})
    _copy_outputs_that_alias_weights(gm, {p for w in weights for p in w.placeholders})
    _detach_out_of_place(gm)
    fold_constant_masks(gm)
    weights, scales = lift_scales(gm, weights, scale_buffers)
    gm.recompile()
    return Captured(
        graph_module=gm,
        weights=weights,
        in_spec=exported.call_spec.in_spec,
        out_spec=exported.call_spec.out_spec,
        device=device,
        input_objects=carried.count_objects(call.tree),
        adapter_scales=scales,
    )


# torch.export patches process-wide state (``nn.Module.__call__`` among it) while it traces. A
# child forked while another thread traced keeps that state half-done, for good: it can neither
# capture nor run graphs, and says so rather than hang or trace by accident.
_exports = [0]
_exports_lock = threading.Lock()
_forked_mid_capture = [False]


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    with _exports_lock:
        _exports[0] += 1
    try:
        yield
    finally:
        with _exports_lock:
            _exports[0] -= 1


def _after_fork_in_child() -> None:
    global _exports_lock
    _exports_lock = threading.Lock()
    if _exports[0]:
        _forked_mid_capture[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def refuse_if_forked_mid_capture() -> None:
    """Raise in a process forked while another thread was capturing a model."""
    if _forked_mid_capture[0]:
        raise VramfxError(
            "this process was forked while another thread was capturing a model with torch.export, "
            "whose process-wide tracing state was copied half-done: nothing can be captured or run "
            "here. Fork before the first call of a new input signature or after it returns (compile "
            "with example_args= to capture up front), or start workers with the 'spawn' method"
        )


def _to_meta(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=_META)


#: Where torch.export's own machinery lives: an error raised there is about what export can express.
_EXPORT_MACHINERY = tuple(
    os.path.join(os.path.dirname(torch.__file__), *part.split("/"))
    for part in ("_export/", "export/", "_dynamo/", "_functorch/", "utils/_pytree.py", "_guards.py")
)
#: Errors of tracing on meta tensors that eager on a real device would not meet.
_META_ARTEFACT = re.compile(r"Meta kernel|fake impl|'Meta' backend|on meta tensors", re.IGNORECASE)
#: ... such as a tensor the model makes on a fixed device meeting the meta inputs.
_DEVICE_MIX = re.compile(r"\bdevice.*\bmeta\b.*\b(cpu|cuda)\b|\bdevice.*\b(cpu|cuda)\b.*\bmeta\b", re.DOTALL)


def export_cannot_express(exc: BaseException) -> bool:
    """Whether ``exc``, raised while exporting, means export cannot express the model — not that
    the call is wrong.

    Yes for export's own kinds of refusal (a guard on data, an output shape that depends on
    data, an op with no meta kernel, a tensor made on another device than the meta inputs),
    for anything raised inside export's machinery (a type it cannot flatten) and for vramfx's
    own :class:`CaptureError`. No for everything the model's code raised on its way (shape
    errors, a hook's exception): eager raises those too.
    """
    from torch._subclasses import fake_tensor
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    refusals = (CaptureError, GuardOnDataDependentSymNode) + tuple(
        getattr(fake_tensor, name)
        for name in (
            "DataDependentOutputException",
            "DynamicOutputShapeException",
            "UnsupportedOperatorException",
            "UnsupportedFakeTensorException",
            "FakeTensorDeviceMismatchError",
        )
        if hasattr(fake_tensor, name)
    )
    if isinstance(exc, refusals):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and frames[-1].filename.startswith(_EXPORT_MACHINERY):
        return True
    message = str(exc)
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(
        _META_ARTEFACT.search(message) or _DEVICE_MIX.search(message)
    )


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)


@contextlib.contextmanager
def _carrying(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """For the export: ``model.forward`` takes lifted objects (rebuilt around the traced tensors)
    and returns its objects lifted (:mod:`vramfx.carried`); its signature stays the model's."""
    had_own = "forward" in model.__dict__
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        (args, kwargs), objects = carried.unlift((args, kwargs), device)
        return carried.lift_outputs(original(*args, **kwargs), objects)

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


def _capture_reason(model: torch.nn.Module, exc: BaseException) -> str:
    reason = " ".join(str(exc).split())
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + " …"
    return (
        f"torch.export could not capture {type(model).__name__} as one graph: "
        f"{type(exc).__name__}: {reason}"
    )


def _original_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has, as the model holds them now."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        out[name] = t
    return out


@contextlib.contextmanager
def _meta_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Swap every parameter and buffer for a meta twin (ties kept; floating ones in ``dtype``
    if given), and eval mode, then restore."""
    twins: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict, str, torch.Tensor]] = []
    training = [(m, m.training) for m in model.modules()]

    def twin(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in twins:
            recast = dtype is not None and t.dtype.is_floating_point and t.dtype != dtype
            meta = _to_meta(t, dtype) if t.device != _META or recast else t
            twins[id(t)] = torch.nn.Parameter(meta, requires_grad=False) if param else meta
        return twins[id(t)]

    try:
        for module in model.modules():
            for store, param in ((module._parameters, True), (module._buffers, False)):
                for key, t in list(store.items()):
                    if t is not None:
                        saved.append((store, key, t))
                        store[key] = twin(t, param)
        model.eval()
        yield
    finally:
        for store, key, t in saved:
            store[key] = t
        for module, was_training in training:
            module.training = was_training


def _check_outputs(exported: torch.export.ExportedProgram) -> None:
    for spec in exported.graph_signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            raise CaptureError(
                f"the model writes to buffer {spec.target!r} during forward; vramfx compiles "
                "inference graphs that leave module state unchanged"
            )
        if spec.kind not in (OutputKind.USER_OUTPUT,):
            raise CaptureError(f"unsupported graph output kind {spec.kind.name} ({spec.target!r})")


def _strip_non_user_outputs(gm: torch.fx.GraphModule, exported: torch.export.ExportedProgram) -> None:
    """Make the graph return exactly the flat user outputs, as a list for ``out_spec``."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = output.args[0]
    specs = exported.graph_signature.output_specs
    assert len(outs) == len(specs), "export output count disagrees with its signature"
    output.args = (tuple(o for o, s in zip(outs, specs) if s.kind == OutputKind.USER_OUTPUT),)


def _retarget(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _retarget(v, device) for k, v in value.items()}
    return value


def _retarget_meta_devices(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Point device constants traced as ``meta`` (``arange(device=meta)``, ``to(x, meta)``) at ``device``."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("call_function", "call_method"):
                node.args = _retarget(node.args, device)
                node.kwargs = _retarget(node.kwargs, device)
        if module is not gm:
            module.recompile()


def _weight_specs(
    exported: torch.export.ExportedProgram,
    aliases: dict[int, tuple[str, ...]],
    originals: dict[str, torch.Tensor],
    model: torch.nn.Module,
) -> tuple[WeightSpec, ...]:
    specs: dict[int, WeightSpec] = {}
    placeholders = {n.name: n for n in exported.graph_module.graph.nodes if n.op == "placeholder"}
    kinds = {
        InputKind.PARAMETER: "parameter",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
    }
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in kinds:
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} ({spec.target!r})")
        node = placeholders[spec.arg.name]
        fake = node.meta["val"]
        original = originals.get(spec.target)
        identity = id(original) if original is not None else id(spec)
        if identity in specs:  # another name of a tied tensor: the same weight
            first = specs[identity]
            specs[identity] = replace(first, placeholders=first.placeholders + (node.name,))
            continue
        if original is not None:
            names = aliases[id(original)]
            value = None if original.device == _META else original.detach()
        else:  # a tensor constant export lifted out of forward
            names = (spec.target,)
            value = exported.constants[spec.target]
            if value.device == _META and value.numel() == 0:  # torch.tensor([]) on meta: nothing to know
                value = torch.empty(value.shape, dtype=value.dtype)
            if value.device == _META:
                raise CaptureError(f"tensor constant {spec.target!r} has no value (created on meta)")
        # The export target of a tied weight may be any of its names; keep it first.
        names = (spec.target,) + tuple(n for n in names if n != spec.target)
        persistent = bool(spec.persistent) if spec.kind == InputKind.BUFFER else spec.kind == InputKind.PARAMETER
        specs[identity] = WeightSpec(
            name=spec.target,
            placeholders=(node.name,),
            kind=kinds[spec.kind],
            shape=tuple(fake.shape),
            dtype=fake.dtype,
            persistent=persistent,
            aliases=names,
            value=value,
            requires_grad=original is not None and original.requires_grad,
        )
    return tuple(specs.values())


#: In-place ops that change a tensor's autograd metadata, never its data.
_METADATA_ONLY = {torch.ops.aten.detach_.default, torch.ops.aten.requires_grad_.default}


def _refuse_weight_writes(gm: torch.fx.GraphModule, weight_placeholders: dict[str, str]) -> None:
    """An in-place op on a weight would change it for later calls, unlike a streamed copy."""
    storage_to_name = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in weight_placeholders:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                storage_to_name[val.untyped_storage()._cdata] = weight_placeholders[node.name]
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or node.target in _METADATA_ONLY:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
            if isinstance(val, torch.Tensor) and val.untyped_storage()._cdata in storage_to_name:
                name = storage_to_name[val.untyped_storage()._cdata]
                raise CaptureError(
                    f"the model writes to buffer {name!r} during forward ({node.target}); vramfx "
                    "compiles inference graphs that leave module state unchanged"
                )


def _detach_out_of_place(gm: torch.fx.GraphModule) -> None:
    """``detach_`` as ``detach``: the same value, and it also works on the arena's views (a
    ``torch.tensor([])`` a cache makes is lifted as a constant, and export detaches it in place)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.detach_.default:
            node.target = torch.ops.aten.detach.default


def _copy_outputs_that_alias_weights(gm: torch.fx.GraphModule, weight_placeholders: set[str]) -> None:
    """Clone outputs that share a weight's memory: a streamed weight's slot is reused after the call."""
    keys = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in weight_placeholders:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                keys.add(val.untyped_storage()._cdata)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = list(output.args[0])
    for i, out in enumerate(outs):
        val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and val.untyped_storage()._cdata in keys:
            with gm.graph.inserting_before(output):
                copy = gm.graph.call_function(torch.ops.aten.clone.default, (out,))
            copy.meta["val"] = torch.empty_like(val)
            outs[i] = copy
    output.args = (tuple(outs),)
