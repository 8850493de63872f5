"""Objects a call passes or returns, carried through a graph as their tensors and rebuilt as eager's."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import vramfx
from vramfx import carried


class Layer:
    def __init__(self, keys: torch.Tensor | None = None):
        self.keys, self.device, self.ready = keys, torch.device("cpu"), keys is not None


class Cache:
    def __init__(self, layers: list[Layer]):
        self.layers, self.scale = layers, 1.0


def test_a_lifted_object_is_rebuilt_with_its_class_attributes_and_tensors():
    shared = Layer(torch.ones(2))
    cache = Cache([shared, Layer(torch.zeros(3)), shared])
    lifted = carried.lift(({"cache": cache, "x": torch.ones(1)},))
    assert lifted.objects == (cache,)
    leaves = pytree.tree_leaves(lifted.tree)
    assert [tuple(t.shape) for t in leaves] == [(2,), (3,), (1,)], "a shared tensor is carried once"
    (rebuilt,) = carried.settle(lifted.tree, (), torch.device("cpu"))
    copy = rebuilt["cache"]
    assert type(copy) is Cache and copy is not cache and copy.scale == 1.0
    assert copy.layers[0] is copy.layers[2], "shared objects stay shared"
    assert torch.equal(copy.layers[1].keys, torch.zeros(3)) and copy.layers[0].ready


def test_the_description_tells_structures_and_values_apart():
    def key(cache: Cache) -> str:
        return str(pytree.tree_flatten(carried.lift((cache,)).tree)[1])

    one = key(Cache([Layer(torch.ones(2))]))
    assert one == key(Cache([Layer(torch.zeros(2))])), "tensor values are inputs, not structure"
    assert one != key(Cache([Layer(torch.ones(2)), Layer(torch.ones(2))]))
    assert one != key(Cache([Layer(None)]))
    negative = Cache([Layer(torch.ones(2))])
    negative.scale = -0.0
    zero = Cache([Layer(torch.ones(2))])
    zero.scale = 0.0
    assert key(negative) != key(zero)


def test_an_input_changed_by_the_model_is_changed_in_place_keeping_its_objects():
    cache = Cache([Layer(torch.ones(2))])
    layer, layers = cache.layers[0], cache.layers
    lifted = carried.lift((cache,))
    (inside,), objects = carried.unlift(lifted.tree, torch.device("cpu"))
    inside.layers[0].keys = torch.cat([inside.layers[0].keys, torch.full((1,), 5.0)])
    inside.layers.append(Layer(torch.zeros(1)))
    inside.scale = 2.0
    out = carried.lift_outputs(inside, objects)
    flat, spec = pytree.tree_flatten(out)
    result = carried.settle(pytree.tree_unflatten(flat, spec), lifted.objects, torch.device("cpu"), states=True)
    assert result is cache, "the object returned is the one passed in"
    assert cache.layers is layers and cache.layers[0] is layer, "its lists and objects keep their identity"
    assert torch.equal(layer.keys, torch.tensor([1.0, 1.0, 5.0])) and cache.scale == 2.0
    assert len(cache.layers) == 2 and torch.equal(cache.layers[1].keys, torch.zeros(1))


def test_objects_that_cannot_be_carried_are_capture_errors():
    loop = Cache([Layer(torch.ones(1))])
    loop.layers.append(loop)
    with pytest.raises(vramfx.CaptureError, match="refers to itself"):
        carried.lift((loop,))

    class Slotted:
        __slots__ = ("t",)

    class HoldsSlotted:
        def __init__(self):
            self.inner = Slotted()
            self.inner.t = torch.ones(1)
            self.t = torch.ones(1)

    with pytest.raises(vramfx.CaptureError, match="keeps tensors outside its attributes"):
        carried.lift((HoldsSlotted(),))


def test_a_model_returning_an_object_is_compiled_and_equals_eager():
    class Returns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            return Cache([Layer(h), Layer(h * 2)])

    torch.manual_seed(0)
    model = Returns().eval()
    fast = vramfx.compile(model, budget="16MiB", device="cpu")
    x = torch.randn(2, 4)
    out, expected = fast(x), model(x)
    assert fast.module_path is None and len(fast.compiled_graphs) == 1
    assert type(out) is Cache and [type(layer) for layer in out.layers] == [Layer, Layer]
    assert all(torch.equal(a.keys, e.keys.detach()) for a, e in zip(out.layers, expected.layers))
    assert out.layers[0].device == torch.device("cpu"), "devices traced as meta are the compute device again"
