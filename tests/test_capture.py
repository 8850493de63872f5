"""capture: meta export of real models into a lifted graph, leaving the model untouched."""

from __future__ import annotations

import pytest
import torch

import vramfx
from tiny_models import ARCHS, build_empty
from vramfx.capture import capture


def test_weights_become_placeholders_and_no_meta_device_remains():
    arch = ARCHS["llama"]
    model = build_empty(arch)
    captured = capture(model, (), arch.inputs(), device="cpu")
    names = {w.name for w in captured.weights}
    assert "embed_tokens.weight" in names and "layers.1.mlp.down_proj.weight" in names
    placeholders = {n.name for n in captured.graph_module.graph.nodes if n.op == "placeholder"}
    assert {p for w in captured.weights for p in w.placeholders} <= placeholders
    for node in captured.graph_module.graph.nodes:
        if node.op == "call_function":
            text = str(node.args) + str(node.kwargs)
            assert "device(type='meta')" not in text, node.format_node()
            assert "meta" not in {str(a) for a in node.args if isinstance(a, torch.device)}


def test_non_persistent_buffers_keep_their_real_values():
    arch = ARCHS["llama"]
    model = build_empty(arch)
    captured = capture(model, (), arch.inputs())
    inv_freq = captured.name_to_weight["rotary_emb.inv_freq"]
    assert inv_freq.kind == "buffer" and not inv_freq.persistent
    assert inv_freq.value is not None and torch.equal(inv_freq.value, model.rotary_emb.inv_freq)


def test_tied_weights_are_one_weight_with_every_name():
    arch = ARCHS["t5_encoder"]
    model = build_empty(arch)
    captured = capture(model, (), arch.inputs())
    tied = [w for w in captured.weights if "shared.weight" in w.aliases]
    assert len(tied) == 1
    assert set(tied[0].aliases) == {"shared.weight", "encoder.embed_tokens.weight"}


def test_the_model_is_left_exactly_as_it_was():
    arch = ARCHS["flux"]
    model = build_empty(arch).train()
    before = {n: t for n, t in model.named_parameters()}
    buffers = {n: t for n, t in model.named_buffers()}
    capture(model, (), arch.inputs())
    assert model.training
    assert all(t is before[n] for n, t in model.named_parameters())
    assert all(t is buffers[n] for n, t in model.named_buffers())


def test_real_inputs_are_not_read_and_constants_are_retargeted():
    class MakesConstants(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            steps = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
            return self.proj(x) + steps

    captured = capture(MakesConstants(), (torch.randn(2, 4),), device="cpu")
    gm = captured.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 3  # weight, bias, x
    devices = [a for n in gm.graph.nodes for a in list(n.args) + list(n.kwargs.values())
               if isinstance(a, torch.device)]
    assert devices and all(d.type == "cpu" for d in devices)


def test_data_dependent_control_flow_is_a_capture_error_with_the_reason():
    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            if h.sum() > 0:
                return h
            return -h

    with pytest.raises(vramfx.CaptureError, match=r"could not capture Branches as one graph: .*data"):
        capture(Branches(), (torch.randn(2, 4),))


def test_a_model_that_writes_its_buffers_is_refused():
    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * 2

    with pytest.raises(vramfx.CaptureError, match="writes to buffer 'calls'"):
        capture(Counts(), (torch.randn(2),))


def test_weight_specs_carry_each_parameters_requires_grad():
    # Kernels depend on the flag even under no_grad; the runtime's copies must match the model.
    arch = ARCHS["llama"]
    model = build_empty(arch)
    model.norm.requires_grad_(False)
    weights = capture(model, (), arch.inputs()).name_to_weight
    assert weights["embed_tokens.weight"].requires_grad
    assert not weights["norm.weight"].requires_grad
    assert not weights["rotary_emb.inv_freq"].requires_grad  # a buffer


def test_a_compute_dtype_captures_floating_weights_in_it_and_leaves_the_model():
    arch = ARCHS["llama"]
    model = build_empty(arch)
    captured = capture(model, (), arch.inputs(), dtype=torch.bfloat16)
    weights = captured.name_to_weight
    assert weights["layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    inv_freq = weights["rotary_emb.inv_freq"]
    assert inv_freq.dtype == torch.bfloat16 and inv_freq.value.dtype == torch.float32  # the module's, not copied
    assert inv_freq.value.data_ptr() == model.rotary_emb.inv_freq.data_ptr()
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    matmuls = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert matmuls and all(n.meta["val"].dtype == torch.bfloat16 for n in matmuls)


class Calls(torch.nn.Module):
    """A Linear around whatever ``step`` does with its output."""

    def __init__(self, step):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.step = step

    def forward(self, x):
        return self.step(self.proj(x))


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (lambda h: h @ torch.ones(5, 3, device=h.device), RuntimeError, r"a and b must have same reduction dim"),
        (lambda h: h.view(3, -1), RuntimeError, r"shape '\[3, -1\]' is invalid"),
        (lambda h: torch.cat([h, h[:, :3]]), RuntimeError, r"Sizes of tensors must match"),
        (lambda h: h.transpose(0, 5), IndexError, r"Dimension out of range"),
    ],
    ids=["matmul", "view", "cat", "transpose"],
)
def test_errors_the_models_code_raises_are_raised_as_they_are(step, error, match):
    with pytest.raises(error, match=match) as info:
        capture(Calls(step), (torch.randn(4, 4),))
    assert not isinstance(info.value, vramfx.CaptureError)
    assert any("eager raises it too" in note for note in info.value.__notes__)
    with pytest.raises(error):  # eager raises too
        Calls(step)(torch.randn(4, 4))


def test_a_hook_raising_during_capture_is_raised_and_the_model_is_left_as_it_was():
    model = Calls(torch.relu)
    handle = model.proj.register_forward_hook(lambda *_: (_ for _ in ()).throw(ValueError("hook says no")))
    with pytest.raises(ValueError, match="hook says no"):
        capture(model, (torch.randn(4, 4),))
    handle.remove()
    assert "forward" not in model.__dict__ and not any(p.is_meta for p in model.parameters())
    assert capture(model, (torch.randn(4, 4),)).weights


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (lambda h: h if h.sum() > 0 else -h, r"GuardOnDataDependentSymNode"),
        (lambda h: torch.zeros(int(h.sum().item())), r"data-dependent"),
        (lambda h: h.to_sparse(), r"NotImplementedError: .*Meta"),
        (lambda h: h + torch.ones(4, 4), r"FakeTensorDeviceMismatchError"),  # made on the CPU, not h's device
        (lambda h: torch.from_numpy(h.numpy()), r"numpy"),
    ],
    ids=["branch_on_data", "shape_from_data", "op_without_meta_kernel", "tensor_on_a_fixed_device", "numpy"],
)
def test_what_export_cannot_express_is_a_capture_error(step, match):
    with pytest.raises(vramfx.CaptureError, match=r"could not capture Calls as one graph: .*" + match):
        capture(Calls(step), (torch.randn(4, 4),))

