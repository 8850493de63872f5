"""vramfx.from_pretrained / compile(ModelClass, folder): saved folders compiled in one line, as the
model's own class, equal to eager, within the budget.

Eager references have their weights in memory torch allocated: a model loaded by
``from_pretrained`` keeps views into the mapped file, at other alignments, where CPU kernels take
other paths and round differently in the last bit.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import vramfx
from pretrained_folders import flux_image, save_flux_pipeline
from tiny_models import ARCHS, assert_same_output
from vramfx.measure import PeakMemory, release_freed_memory


@pytest.fixture(scope="module")
def export_state_paid() -> None:
    """torch.export's one-time process state is not the model's: an earlier compile pays it."""
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)


def in_torch_memory(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def minimum_budget(model_class, path, inputs, **kwargs) -> int:
    """The smallest budget that plans this call (from the BudgetError of a 1-byte budget)."""
    with pytest.raises(vramfx.BudgetError) as info:
        vramfx.from_pretrained(model_class, path, budget=1, device="cpu", example_kwargs=inputs, **kwargs)
    return info.value.minimum_bytes


def recorded_call(module: torch.nn.Module, run) -> dict:
    """The keyword arguments of ``module``'s first call while ``run()`` runs."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return calls[0], result


def eager_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())


def flux_folder(tmp_path, dtype=torch.float32, **save):
    torch.manual_seed(0)
    model = ARCHS["flux"].build().eval().to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="40KB", **save)
    return tmp_path


def test_flux_pipeline_from_pretrained_takes_the_compiled_transformer(tmp_path, export_state_paid):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root = tmp_path / "flux"
    save_flux_pipeline(root)
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    eager = FluxPipeline.from_pretrained(root)
    in_torch_memory(eager.transformer)
    call, expected = recorded_call(eager.transformer, lambda: flux_image(eager))
    weight_bytes = sum(p.nbytes for p in eager.transformer.parameters())
    del eager

    budget = minimum_budget(FluxTransformer2DModel, root, call) + weight_bytes // 2
    pipe = FluxPipeline.from_pretrained(root, transformer=None)  # everything but the transformer
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        fast = vramfx.from_pretrained(FluxTransformer2DModel, root, subfolder="transformer", budget=budget,
                                      device="cpu")
        pipe.transformer = fast
        image = flux_image(pipe)
    assert peak.growth_bytes <= budget, (peak.growth_bytes, budget)
    assert torch.equal(expected, image)
    assert isinstance(fast, FluxTransformer2DModel)
    assert fast.plan.streamed_bytes > 0

    # The diffusers idiom: the pipeline root, the compiled model passed in the transformer's place.
    fast = vramfx.compile(FluxTransformer2DModel, root, budget=budget, device="cpu")  # finds transformer/
    pipe = FluxPipeline.from_pretrained(root, transformer=fast)
    assert pipe.transformer is fast
    assert torch.equal(expected, flux_image(pipe))
    assert repr(fast).startswith("Compiled[FluxTransformer2DModel](budget=")


def test_a_bf16_folder_compiles_in_one_line_and_equals_eager_in_bf16(tmp_path, export_state_paid):
    from diffusers import FluxTransformer2DModel

    folder = flux_folder(tmp_path, torch.bfloat16)
    eager = in_torch_memory(FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval())
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in ARCHS["flux"].inputs().items()}
    with torch.no_grad():
        expected = eager(**inputs)
    weight_bytes = sum(p.nbytes for p in eager.parameters())
    del eager
    budget = minimum_budget(FluxTransformer2DModel, folder, inputs) + weight_bytes // 2
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        fast = vramfx.compile(FluxTransformer2DModel, folder, budget=budget, device="cpu")
        outputs = [fast(**inputs), fast(**inputs)]
    assert peak.growth_bytes <= budget, (peak.growth_bytes, budget)
    for out in outputs:
        assert_same_output(expected, out)
    assert fast.dtype == torch.bfloat16 and fast.config.num_layers == 1


def test_a_model_built_in_another_dtype_is_told_the_fix_first(tmp_path):
    from diffusers import FluxTransformer2DModel

    folder = flux_folder(tmp_path, torch.bfloat16)
    with vramfx.skip_model_initialization():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder))
    with pytest.raises(vramfx.WeightsError) as info:
        vramfx.compile(model, budget="64MiB", weights=folder, device="cpu", example_kwargs=ARCHS["flux"].inputs())
    message = str(info.value)
    assert message.startswith("The checkpoint stores bfloat16 weights and the model was built in float32: build")
    assert len(message) < 700


def test_torch_dtype_computes_in_another_dtype(tmp_path, export_state_paid):
    from diffusers import FluxTransformer2DModel

    folder = flux_folder(tmp_path, torch.bfloat16)
    eager = in_torch_memory(FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval())
    inputs = ARCHS["flux"].inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    fast = vramfx.from_pretrained(FluxTransformer2DModel, folder, budget="64MiB", device="cpu",
                                  torch_dtype=torch.float32)
    assert fast.dtype == torch.float32
    assert_same_output(expected, fast(**inputs))


def test_an_fp16_variant_beside_the_default_weights(tmp_path, export_state_paid):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = ARCHS["flux"].build().eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    model.to(torch.float16).save_pretrained(tmp_path, variant="fp16", max_shard_size="40KB")
    assert list(tmp_path.glob("*.index.fp16.json")) and list(tmp_path.glob("*.index.json"))
    inputs = ARCHS["flux"].inputs()
    for variant, dtype in [(None, torch.float32), ("fp16", torch.float16)]:
        eager = FluxTransformer2DModel.from_pretrained(tmp_path, variant=variant, torch_dtype=dtype).eval()
        call = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            expected = in_torch_memory(eager)(**call)
        budget = minimum_budget(FluxTransformer2DModel, tmp_path, call, variant=variant) + eager_bytes(eager) // 2
        release_freed_memory()
        with PeakMemory("cpu") as peak:
            fast = vramfx.from_pretrained(FluxTransformer2DModel, tmp_path, variant=variant, budget=budget,
                                          device="cpu")
            out = fast(**call)
        assert peak.growth_bytes <= budget
        assert fast.plan.streamed_bytes > 0 and fast.dtype == dtype
        assert_same_output(expected, out)
    with pytest.raises(vramfx.WeightsError, match=r"holds no weights in variant 'bf16'\. It holds variant 'fp16'"):
        vramfx.from_pretrained(FluxTransformer2DModel, tmp_path, variant="bf16", budget="24MiB", device="cpu")


def test_only_a_variant_says_to_pass_it(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ARCHS["flux"].build().to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(vramfx.WeightsError, match=r"only in the variant\(s\) fp16; pass variant='fp16'"):
        vramfx.from_pretrained(FluxTransformer2DModel, tmp_path, budget="24MiB", device="cpu")


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "transformer."])
def test_a_prefixed_single_file_loads(tmp_path, prefix, export_state_paid):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    eager = ARCHS["flux"].build().eval()
    path = tmp_path / "flux-tiny.safetensors"
    safetensors.torch.save_file({prefix + k: v.contiguous() for k, v in eager.state_dict().items()}, path)
    inputs = ARCHS["flux"].inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    budget = minimum_budget(FluxTransformer2DModel, path, inputs, config=dict(eager.config)) + eager_bytes(eager) // 2
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        # Copied, not used in place where the file lies: the test measures streaming.
        fast = vramfx.from_pretrained(FluxTransformer2DModel, path, config=dict(eager.config), budget=budget,
                                      device="cpu", in_place=False)
        out = fast(**inputs)
    assert peak.growth_bytes <= budget
    assert_same_output(expected, out)
    assert fast.plan.streamed_bytes > 0
    with vramfx.skip_model_initialization():
        empty = ARCHS["flux"].build().eval()
    assert_same_output(expected, vramfx.compile(empty, budget="24MiB", weights=path, device="cpu")(**inputs))


def test_stored_keys_in_another_layout_are_shown(tmp_path):
    torch.manual_seed(0)
    eager = ARCHS["flux"].build().eval()
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"net.x." + k: v.contiguous() for k, v in list(eager.state_dict().items())[:3]}, path)
    with vramfx.skip_model_initialization():
        empty = ARCHS["flux"].build().eval()
    with pytest.raises(vramfx.WeightsError, match=r"The weights hold 3 key\(s\), e\.g\. net\.x\..* prefix 'net\.x\.'"):
        vramfx.compile(empty, budget="24MiB", weights=path, device="cpu", example_kwargs=ARCHS["flux"].inputs())


def test_a_pipeline_root_needs_a_subfolder_when_the_class_is_ambiguous(tmp_path):
    from diffusers import FluxTransformer2DModel

    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "X", "a": ["diffusers", "FluxTransformer2DModel"], "b": ["diffusers", "FluxTransformer2DModel"],
    }))
    with pytest.raises(ValueError, match=r"several components .* a \(FluxTransformer2DModel\), b .* subfolder="):
        vramfx.from_pretrained(FluxTransformer2DModel, tmp_path, budget="24MiB", device="cpu")
    with pytest.raises(TypeError, match="torch_dtype must be a torch.dtype"):
        vramfx.from_pretrained(FluxTransformer2DModel, tmp_path, budget="24MiB", torch_dtype="bf16")


def test_a_bf16_transformers_folder_equals_eager_in_bf16(tmp_path, export_state_paid):
    from transformers import LlamaModel

    torch.manual_seed(0)
    ARCHS["llama"].build().to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    eager = in_torch_memory(LlamaModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval())
    inputs = ARCHS["llama"].inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    budget = minimum_budget(LlamaModel, tmp_path, inputs) + eager_bytes(eager) // 2
    release_freed_memory()
    with PeakMemory("cpu") as peak:
        fast = vramfx.compile(LlamaModel, tmp_path, budget=budget, device="cpu")
        out = fast(**inputs)
    assert peak.growth_bytes <= budget, (peak.growth_bytes, budget)
    assert_same_output(expected, out)
    assert fast.dtype == torch.bfloat16 and fast.plan.streamed_bytes > 0
    # Buffers transformers computes in float32 stay so, as in eager.
    assert fast.model.rotary_emb.inv_freq.dtype == eager.rotary_emb.inv_freq.dtype
