"""Changes to the model after compile are seen: its graphs are captured again (hooks, a
parameter replaced, values of real weights changed, attention processors, dtype)."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved


@pytest.fixture
def flux(tmp_path):
    eager = build_saved(ARCHS["flux"], tmp_path)
    fast = vramfx.compile(build_empty(ARCHS["flux"]), budget="64MiB", weights=tmp_path, device="cpu")
    return eager, fast


def both(eager, fast, inputs):
    with torch.no_grad():
        expected = eager(**inputs)
    assert_same_output(expected, fast(**inputs))
    return expected


def test_a_hook_registered_after_the_first_call_is_honoured(flux):
    eager, fast = flux
    inputs = ARCHS["flux"].inputs()
    plain = both(eager, fast, inputs)
    handles = [m.proj_out.register_forward_hook(lambda mod, args, out: out * 2) for m in (eager, fast.model)]
    doubled = both(eager, fast, inputs)
    assert not torch.equal(plain[0], doubled[0])
    for h in handles:
        h.remove()
    both(eager, fast, inputs)


def test_attention_processors_set_through_the_compiled_model_are_honoured(flux):
    eager, fast = flux
    inputs = ARCHS["flux"].inputs()
    plain = both(eager, fast, inputs)

    class Halving:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, *args, **kwargs):
            out = self.inner(attn, *args, **kwargs)
            return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

    for m in (eager, fast):
        m.set_attn_processor({k: Halving(v) for k, v in m.attn_processors.items()})
    assert not torch.equal(plain[0], both(eager, fast, inputs)[0])


def test_real_weights_replaced_or_changed_in_place_are_honoured():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    fast = vramfx.compile(model, budget="16MiB", device="cpu")
    x = torch.randn(3, 16)
    assert torch.equal(model(x), fast(x))
    with torch.no_grad():
        model[2].weight.mul_(3)  # in place: the resident copy would be stale
    assert torch.equal(model(x), fast(x))
    model[0].weight = torch.nn.Parameter(torch.randn(16, 16))
    assert torch.equal(model(x), fast(x))


def test_a_model_cast_after_compile_is_refused_with_the_fix(flux):
    eager, fast = flux
    fast(**ARCHS["flux"].inputs())
    fast.model.to(torch.bfloat16)
    with pytest.raises(vramfx.WeightsError, match="The checkpoint stores float32 weights and the model was built in bfloat16"):
        fast(**{k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in ARCHS["flux"].inputs().items()})
