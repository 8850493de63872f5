"""What compile returns is an instance of the model's own class: isinstance, config, mixin
methods, a readable repr; methods that cannot work on streamed weights refuse with what to do."""

from __future__ import annotations

import pickle

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.compiled_class import compiled_class


def test_the_compiled_model_is_an_instance_of_the_models_class(tmp_path):
    from diffusers import FluxTransformer2DModel, ModelMixin

    eager = build_saved(ARCHS["flux"], tmp_path)
    fast = vramfx.compile(build_empty(ARCHS["flux"]), budget="64MiB", weights=tmp_path, device="cpu")
    assert isinstance(fast, FluxTransformer2DModel) and isinstance(fast, ModelMixin)
    assert isinstance(fast, vramfx.CompiledModule)
    assert type(fast) is compiled_class(FluxTransformer2DModel)  # one class per model class
    assert type(fast).__name__ == "FluxTransformer2DModel" and type(fast).__module__ == FluxTransformer2DModel.__module__
    assert fast.config.num_layers == 1 and fast.dtype == torch.float32 and fast.device == torch.device("cpu")
    assert repr(fast) == "Compiled[FluxTransformer2DModel](budget=64.0 MiB, device=cpu, not captured yet)"
    inputs = ARCHS["flux"].inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    assert_same_output(expected, fast(**inputs))
    assert "1 graph(s), plan: peak" in repr(fast)
    # Mixin methods run on the model's modules.
    assert set(fast.attn_processors) == set(eager.attn_processors)
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in eager.parameters())
    import inspect

    assert "hidden_states" in inspect.signature(fast.forward).parameters


def test_methods_that_cannot_work_on_streamed_weights_refuse(tmp_path):
    build_saved(ARCHS["flux"], tmp_path)
    fast = vramfx.compile(build_empty(ARCHS["flux"]), budget="64MiB", weights=tmp_path, device="cpu")
    with pytest.raises(TypeError, match=r"fuse_qkv_projections\(\) cannot run on a compiled model.*Instead: fuse"):
        fast.fuse_qkv_projections()
    with pytest.raises(TypeError, match="inference only"):
        fast.enable_gradient_checkpointing()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(fast)


def test_a_container_module_keeps_its_length_and_truth():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    fast = vramfx.compile(model, budget="16MiB", device="cpu")
    assert isinstance(fast, torch.nn.Sequential)
    assert len(fast) == 2 and bool(fast) and isinstance(fast[0], torch.nn.Linear)
    x = torch.randn(2, 4)
    assert torch.equal(model(x), fast(x))


def test_a_transformers_model_keeps_its_class_surface(tmp_path):
    from transformers import LlamaModel, PreTrainedModel

    build_saved(ARCHS["llama"], tmp_path)
    fast = vramfx.compile(build_empty(ARCHS["llama"]), budget="64MiB", weights=tmp_path, device="cpu")
    assert isinstance(fast, LlamaModel) and isinstance(fast, PreTrainedModel)
    assert fast.config.hidden_size == 64 and fast.main_input_name == "input_ids"
    assert fast.num_parameters() == sum(p.numel() for p in fast.model.parameters())
