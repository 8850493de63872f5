"""skip_model_initialization: meta parameters, real buffers, no init work, everything restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vramfx import skip_model_initialization
from vramfx.budget import rss_anon_bytes


class _WithBuffers(nn.Module):
    """A module whose buffers are computed at construction, like a rotary embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)
        self.register_buffer("table", torch.empty(4))
        nn.init.constant_(self.table, 3.0)  # an init function on a buffer must still run


class _Scaled(nn.Parameter):
    """A Parameter subclass, as quantisation libraries define."""


def _init_bindings() -> dict[str, object]:
    """Every place a test can see an init function bound."""
    return {
        "init.normal_": torch.nn.init.normal_,
        "init.kaiming_uniform_": torch.nn.init.kaiming_uniform_,
        "activation.xavier_uniform_": torch.nn.modules.activation.xavier_uniform_,
        "register_hooks": dict(torch.nn.modules.module._global_parameter_registration_hooks),
    }


def test_parameters_are_meta_and_buffers_real():
    with skip_model_initialization():
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), _WithBuffers())
    assert all(p.is_meta for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert model[0].weight.shape == (5, 4)
    assert not any(b.is_meta for b in model.buffers())
    assert torch.equal(model[1].running_var, torch.ones(5))
    reference = _WithBuffers()
    assert torch.equal(model[2].inv_freq, reference.inv_freq)
    assert torch.equal(model[2].table, torch.full((4,), 3.0))


def test_parameter_attributes_are_kept():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Parameter(torch.empty(3, dtype=torch.float16), requires_grad=False)
            self.scaled = _Scaled(torch.empty(2))
            self.scaled.tag = "kept"

    with skip_model_initialization():
        m = M()
    assert m.frozen.is_meta and m.frozen.dtype == torch.float16 and not m.frozen.requires_grad
    assert type(m.scaled) is _Scaled and m.scaled.is_meta and m.scaled.requires_grad


def test_real_device_gives_uninitialised_parameters_without_init_kernels():
    with skip_model_initialization(device="cpu"):
        layer = nn.Linear(3, 3)
        param = nn.Parameter(torch.zeros(3))
        nn.init.normal_(param)  # skipped: it is a parameter
        plain = nn.init.ones_(torch.zeros(3))  # runs: a plain tensor may be a buffer
    assert layer.weight.device.type == "cpu" and not layer.weight.is_meta
    assert torch.equal(param, torch.zeros(3))
    assert torch.equal(plain, torch.ones(3))


def test_everything_is_restored_on_exit_and_on_error():
    before = _init_bindings()
    with skip_model_initialization():
        assert _init_bindings() != before
    assert _init_bindings() == before
    with pytest.raises(RuntimeError, match="boom"):
        with skip_model_initialization():
            raise RuntimeError("boom")
    assert _init_bindings() == before
    assert not nn.Linear(2, 2).weight.is_meta
    assert nn.init.ones_(nn.Parameter(torch.zeros(2))).sum() == 2


def test_nesting_innermost_device_wins_and_outer_is_restored():
    before = _init_bindings()
    with skip_model_initialization():
        with skip_model_initialization(device="cpu"):
            inner = nn.Linear(2, 2)
        outer = nn.Linear(2, 2)
    assert not inner.weight.is_meta
    assert outer.weight.is_meta
    assert _init_bindings() == before


def test_transformers_llama_constructs_with_meta_params_and_true_rotary_buffer():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    reference = transformers.LlamaForCausalLM(config)
    with skip_model_initialization():
        model = transformers.LlamaForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and not any(b.is_meta for b in buffers.values())
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def _flux_kwargs() -> dict:
    return dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def _unet_kwargs() -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


@pytest.mark.parametrize(
    "cls_name, kwargs", [("FluxTransformer2DModel", _flux_kwargs()), ("UNet2DConditionModel", _unet_kwargs())]
)
def test_diffusers_models_construct_with_meta_params(cls_name, kwargs):
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, cls_name)
    reference = cls(**kwargs)
    with skip_model_initialization():
        model = cls(**kwargs)
    assert all(p.is_meta for p in model.parameters())
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    real = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, real[name])


def test_a_12b_parameter_model_takes_no_memory():
    transformers = pytest.importorskip("transformers")
    # Llama-2-13B-like shapes; built eagerly this would need ~50 GB.
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    )
    before = rss_anon_bytes()
    with skip_model_initialization():
        model = transformers.LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters > 12e9
    assert all(p.is_meta for p in model.parameters())
    assert rss_anon_bytes() - before < 256 * 2**20 or not before
    assert math.isclose(model.model.rotary_emb.inv_freq[0].item(), 1.0)
