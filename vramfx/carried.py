"""Objects a call passes or returns that export cannot flatten, carried through a graph as their tensors.

A causal LM called the ordinary way (transformers' default ``use_cache=True``) returns a
``DynamicCache``: an object holding tensors in attributes of other objects, which is neither a
tensor nor a pytree container, so ``torch.export`` refuses it. Here such an object is *lifted*
into a :class:`Carried` pytree node: its tensors are the node's children and a :class:`Template`
(the object with every tensor replaced by a numbered slot) is its context. The graph reads and
returns the tensors; after a call each object is rebuilt from its template, and an input object
the model changed (a cache it appended to) is changed in place, as eager would have changed it:
the same object, its attributes set to what the model left in them.

A template is part of the input signature (its description names every class, attribute and
non-tensor value), so a graph is reused only for objects of the same structure.

Examples
--------
>>> class Box:
...     def __init__(self, t):
...         self.t, self.n = t, 3
>>> lifted = lift((Box(torch.ones(2)),))
>>> [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(lifted.tree)]
[(2,)]
>>> box = settle(lifted.tree, (), torch.device("cpu"))[0]
>>> type(box).__name__, box.n, box.t.tolist()
('Box', 3, [1.0, 1.0])
"""

from __future__ import annotations

import enum
import itertools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vramfx.errors import CaptureError

_PLAIN = (
    type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
    torch.memory_format, enum.Enum, slice, range, type(Ellipsis),
)
_META = torch.device("meta")


# -- the skeleton of an object: its structure with tensors as numbered slots ----------------------
@dataclass(frozen=True)
class _Slot:
    index: int


@dataclass(frozen=True, eq=False)
class _Obj:
    cls: type
    attrs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class _Seq:
    kind: type
    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Map:
    items: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True, eq=False)
class _Shared:
    """A value inside an object that holds no tensors of its own (a config): kept by reference."""

    value: Any


@dataclass(frozen=True)
class _Input:
    """The call's input object number ``index``, wherever an output or another input refers to it."""

    index: int


class Template:
    """An object with its tensors taken out: rebuilt around new tensors, compared by description."""

    def __init__(self, skeleton: Any, tensors: int) -> None:
        self.skeleton = skeleton
        self.tensors = tensors
        self.description = _describe(skeleton)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.description == self.description

    def __hash__(self) -> int:
        return hash(self.description)

    def __repr__(self) -> str:
        return self.description


class Carried:
    """A pytree node standing for one object: its tensors, and the template they fill."""

    def __init__(self, tensors: Sequence[Any], template: Template) -> None:
        self.tensors = list(tensors)
        self.template = template

    def __repr__(self) -> str:
        return f"Carried({self.template!r})"


pytree.register_pytree_node(
    Carried,
    lambda c: (c.tensors, c.template),
    lambda values, template: Carried(values, template),
    serialized_type_name="vramfx.carried.Carried",
    flatten_with_keys_fn=lambda c: ([(pytree.SequenceKey(i), t) for i, t in enumerate(c.tensors)], c.template),
)


def carriable(value: object) -> bool:
    """Whether ``value`` is an object to carry: it has attributes, is no tensor, plain value or callable."""
    if isinstance(value, (torch.Tensor, Carried, type, types.ModuleType, *_PLAIN)) or callable(value):
        return False
    return hasattr(value, "__dict__")


# -- lifting ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lifted:
    """A call's inputs with every carriable object replaced by a Carried node, and those objects."""

    tree: Any
    objects: tuple[object, ...]


def lift(tree: Any) -> Lifted:
    """``tree`` with every carriable leaf lifted; an object met twice is one input.

    Raises
    ------
    CaptureError
        An object that cannot be carried (a cycle, attributes outside ``__dict__``).
    """
    leaves, spec = pytree.tree_flatten(tree)
    if not any(carriable(leaf) for leaf in leaves):
        return Lifted(tree, ())
    objects: list[object] = []
    index: dict[int, int] = {}
    out = []
    for leaf in leaves:
        if not carriable(leaf):
            out.append(leaf)
        elif id(leaf) in index:
            out.append(Carried((), Template(_Input(index[id(leaf)]), 0)))
        else:
            index[id(leaf)] = len(objects)
            objects.append(leaf)
            out.append(_carry(leaf, {}))
    return Lifted(pytree.tree_unflatten(out, spec), tuple(objects))


def lift_outputs(out: Any, inputs: Sequence[object]) -> Any:
    """A forward's output with its objects lifted; with input objects, ``(output, their states)``.

    An output object that is one of ``inputs`` becomes a reference to it; each input's state
    after the forward is carried too, so a call can set it on the caller's object.
    """
    refs = {id(obj): k for k, obj in enumerate(inputs)}

    def one(leaf: Any) -> Any:
        if not carriable(leaf):
            return leaf
        if id(leaf) in refs:
            return Carried((), Template(_Input(refs[id(leaf)]), 0))
        return _carry(leaf, refs)

    lifted = pytree.tree_map(one, out)
    if not inputs:
        return lifted
    states = tuple(_carry(obj, {i: k for i, k in refs.items() if i != id(obj)}) for obj in inputs)
    return (lifted, states)


def _carry(obj: object, refs: dict[int, int]) -> Carried:
    walk = _Walk(refs)
    skeleton = walk.skeleton(obj, frozenset())
    return Carried(walk.tensors, Template(skeleton, len(walk.tensors)))


class _Walk:
    """Builds one object's skeleton: each tensor and each object once, however often it is met."""

    def __init__(self, refs: dict[int, int]) -> None:
        self.refs = refs
        self.tensors: list[Any] = []
        self.slots: dict[int, int] = {}
        self.objects: dict[int, _Obj] = {}

    def skeleton(self, value: Any, path: frozenset[int]) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in self.slots:
                self.slots[id(value)] = len(self.tensors)
                self.tensors.append(value)
            return _Slot(self.slots[id(value)])
        if isinstance(value, _PLAIN):
            return value
        if id(value) in self.refs:
            return _Input(self.refs[id(value)])
        if id(value) in path:
            raise CaptureError(
                f"a {type(value).__name__} in the call's inputs or outputs refers to itself; it cannot be carried"
            )
        if id(value) in self.objects:
            return self.objects[id(value)]
        path = path | {id(value)}
        if type(value) in (list, tuple):
            return _Seq(type(value), tuple(self.skeleton(v, path) for v in value))
        if type(value) is dict:
            return _Map(tuple((k, self.skeleton(v, path)) for k, v in value.items()))
        if not _holds_tensors(value, set()):
            return _Shared(value)
        if _slot_names(type(value)) or not carriable(value):
            raise CaptureError(
                f"{type(value).__name__} in the call's inputs or outputs keeps tensors outside its attributes; "
                "it cannot be carried through a graph"
            )
        node = _Obj(type(value), ())
        self.objects[id(value)] = node
        object.__setattr__(node, "attrs", tuple((k, self.skeleton(v, path)) for k, v in vars(value).items()))
        return node


def _slot_names(cls: type) -> set[str]:
    """Attributes a class keeps outside ``__dict__``."""
    names: set[str] = set()
    for base in cls.__mro__:
        slots = base.__dict__.get("__slots__", ())
        names.update([slots] if isinstance(slots, str) else slots)
    return names - {"__dict__", "__weakref__"}


def _holds_tensors(value: Any, seen: set[int]) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, _PLAIN) or id(value) in seen:
        return False
    seen.add(id(value))
    if type(value) in (list, tuple):
        return any(_holds_tensors(v, seen) for v in value)
    if type(value) is dict:
        return any(_holds_tensors(v, seen) for v in value.values())
    attrs = list(vars(value).values()) if hasattr(value, "__dict__") else []
    attrs += [getattr(value, name, None) for name in _slot_names(type(value))]
    return not callable(value) and any(_holds_tensors(v, seen) for v in attrs)


def _describe(node: Any) -> str:
    if isinstance(node, _Slot):
        return f"${node.index}"
    if isinstance(node, _Input):
        return f"<input object {node.index}>"
    if isinstance(node, _Shared):
        return f"<{type(node.value).__qualname__} at {id(node.value):#x}>"
    if isinstance(node, _Seq):
        inner = ", ".join(_describe(v) for v in node.items)
        return f"[{inner}]" if node.kind is list else f"({inner}{',' if len(node.items) == 1 else ''})"
    if isinstance(node, _Map):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in node.items) + "}"
    if isinstance(node, _Obj):
        attrs = ", ".join(f"{k}={_describe(v)}" for k, v in node.attrs)
        return f"{node.cls.__module__}.{node.cls.__qualname__}({attrs})"
    return repr(node)  # repr tells -0.0 from 0.0 and keeps nan equal to nan


# -- rebuilding ------------------------------------------------------------------------------------
def unlift(tree: Any, device: torch.device) -> tuple[Any, tuple[object, ...]]:
    """Inside capture: every Carried input rebuilt as an object; the objects, by input number.

    Devices equal to ``device`` read as ``meta`` here, where every tensor is meta.
    """
    objects: list[object] = []

    def retarget(d: torch.device) -> torch.device:
        return _META if _same_device(d, device) else d

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, Carried):
            return leaf
        obj = _Rebuild(leaf.tensors, objects, retarget).value(leaf.template.skeleton)
        if not isinstance(leaf.template.skeleton, _Input):
            objects.append(obj)
        return obj

    rebuilt = pytree.tree_map(one, tree, is_leaf=lambda x: isinstance(x, Carried))
    return rebuilt, tuple(objects)


def settle(result: Any, inputs: Sequence[object], device: torch.device, *, states: bool = False) -> Any:
    """After a call: outputs rebuilt as objects on ``device``; with ``states``, ``result`` is
    ``(output, input states)`` and each state is first set on the caller's input object."""

    def retarget(d: torch.device) -> torch.device:
        return device if d.type == "meta" else d

    if states:
        result, carried_states = result
        for obj, state in zip(inputs, carried_states):
            _Rebuild(state.tensors, inputs, retarget).update(obj, state.template.skeleton)

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, Carried):
            return leaf
        return _Rebuild(leaf.tensors, inputs, retarget).value(leaf.template.skeleton)

    return pytree.tree_map(one, result, is_leaf=lambda x: isinstance(x, Carried))


def count_objects(tree: Any) -> int:
    """How many input objects a lifted tree carries (an object passed twice counts once)."""
    leaves = pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, Carried))
    return sum(isinstance(x, Carried) and not isinstance(x.template.skeleton, _Input) for x in leaves)


def carries(spec: pytree.TreeSpec) -> bool:
    """Whether a tree of this structure holds a Carried node."""
    if spec.type is Carried:
        return True
    return any(carries(child) for child in spec.children())


class _Rebuild:
    """Turns a skeleton back into values, around ``tensors``; shared objects stay shared."""

    def __init__(self, tensors: Sequence[Any], inputs: Sequence[object], retarget: Callable[[torch.device], torch.device]):
        self.tensors = tensors
        self.inputs = inputs
        self.retarget = retarget
        self.made: dict[int, object] = {}

    def value(self, node: Any) -> Any:
        if isinstance(node, _Slot):
            return self.tensors[node.index]
        if isinstance(node, _Input):
            return self.inputs[node.index]
        if isinstance(node, _Shared):
            return node.value
        if isinstance(node, torch.device):
            return self.retarget(node)
        if isinstance(node, _Seq):
            return node.kind(self.value(v) for v in node.items)
        if isinstance(node, _Map):
            return {k: self.value(v) for k, v in node.items}
        if isinstance(node, _Obj):
            if id(node) not in self.made:
                obj = node.cls.__new__(node.cls)
                self.made[id(node)] = obj
                vars(obj).update({k: self.value(v) for k, v in node.attrs})
            return self.made[id(node)]
        return node

    def update(self, target: object, node: _Obj) -> None:
        """Set ``target``'s attributes to ``node``'s, keeping the identity of the objects and lists
        inside it where their class still matches (the model changed them in place)."""
        if id(node) in self.made:
            return
        self.made[id(node)] = target
        attrs = dict(node.attrs)
        state = vars(target)
        for name in [n for n in state if n not in attrs]:
            del state[name]
        for name, child in attrs.items():
            state[name] = self._in_place(state.get(name), child)

    def _in_place(self, current: Any, node: Any) -> Any:
        if isinstance(node, _Obj) and type(current) is node.cls and id(node) not in self.made:
            self.update(current, node)
            return current
        if isinstance(node, _Seq) and node.kind is list and type(current) is list:
            current[:] = [self._in_place(c, n) for c, n in itertools.zip_longest(current[: len(node.items)], node.items)]
            return current
        if isinstance(node, _Map) and type(current) is dict:
            new = {k: self._in_place(current.get(k), n) for k, n in node.items}
            current.clear()
            current.update(new)
            return current
        return self.value(node)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
