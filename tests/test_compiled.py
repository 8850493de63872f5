"""CompiledModule: behaves like the model, caches per signature, keeps its budget, fails clearly."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

import vramfx
from tiny_models import ARCHS, build_empty, build_saved, further_graph_bytes, streaming_budget
from vramfx.measure import PeakMemory


class Stack(torch.nn.Module):
    """A small model with real weights: every call streams them from host memory."""

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def stack_budget(model: torch.nn.Module, x: torch.Tensor) -> int:
    """A budget that holds about one layer beyond the minimum: everything else streams."""
    with pytest.raises(vramfx.BudgetError) as info:
        vramfx.compile(model, budget=1, device="cpu", margin_bytes=2 * 2**20, example_args=(x,))
    layer = model.layers[0]
    return info.value.minimum_bytes + layer.weight.nbytes + layer.bias.nbytes


def test_flux_pipeline_gives_the_same_image(tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    eager = build_saved(ARCHS["flux"], tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    ).eval()

    def image(transformer):
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        return pipe(
            prompt_embeds=torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3)),
            pooled_prompt_embeds=torch.randn(1, 32, generator=torch.Generator().manual_seed(4)),
            height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images

    weights = vramfx.DiskMap(tmp_path)
    empty = build_empty(ARCHS["flux"])
    budget = streaming_budget(empty, weights, ARCHS["flux"].inputs())
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu")
    assert torch.equal(image(eager), image(fast))
    assert fast.plan.streamed_bytes > 0
    assert len(fast.compiled_graphs) == 1, "every denoising step has the same signature"


def test_budget_is_kept_measured_as_rss_anon(tmp_path):
    """A 0.55 GB model at 25% of its weights: RssAnon growth over compile + 3 calls stays within budget."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = LlamaModel(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    assert weight_bytes >= 0.5e9
    eager.save_pretrained(tmp_path, max_shard_size="200MB")
    with torch.no_grad():
        expected = eager(input_ids=ids, use_cache=False).last_hidden_state
    del eager
    gc.collect()

    with vramfx.skip_model_initialization():
        empty = LlamaModel(config).eval()
    # torch.export's one-time state (~90 MB on a process's first compile) is not the model's.
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)
    budget = weight_bytes // 4
    with PeakMemory("cpu") as peak:
        fast = vramfx.compile(empty, budget=budget, weights=vramfx.DiskMap(tmp_path), device="cpu",
                              example_kwargs={"input_ids": ids, "use_cache": False})
        outputs = [fast(input_ids=ids, use_cache=False).last_hidden_state for _ in range(3)]
    assert all(torch.equal(expected, out) for out in outputs)
    assert fast.plan.peak_bytes <= budget
    assert fast.plan.streamed_bytes > 0
    # Everything the process grew by: the graph, the plan's memory, the allocator's slack.
    assert peak.growth_bytes <= budget, (peak.growth_bytes, budget)


def test_too_small_a_budget_states_the_minimum_and_the_minimum_works(tmp_path):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    empty, inputs = build_empty(arch), arch.inputs()
    with pytest.raises(vramfx.BudgetError, match=r"below the minimum of .* pass budget >=") as info:
        vramfx.compile(empty, budget="1MiB", weights=tmp_path, device="cpu", example_kwargs=inputs)
    minimum = info.value.minimum_bytes
    assert minimum > 2**20
    fast = vramfx.compile(empty, budget=minimum, weights=tmp_path, device="cpu", example_kwargs=inputs)
    assert fast.plan.peak_bytes <= minimum


def test_budget_error_surfaces_on_first_call_without_example_inputs(tmp_path):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    fast = vramfx.compile(build_empty(arch), budget="1MiB", weights=tmp_path, device="cpu")
    assert fast.plan is None
    with pytest.raises(vramfx.BudgetError):
        fast(**arch.inputs())


def test_missing_and_mismatched_weights_are_listed(tmp_path):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    partial = {k: v for k, v in vramfx.load_state_dict(tmp_path).items() if "layers.1." not in k}
    with pytest.raises(vramfx.WeightsError, match=r"have no weight .*layers\.1\."):
        vramfx.compile(build_empty(arch), budget="1GB", weights=partial, device="cpu",
                       example_kwargs=arch.inputs())
    wrong = dict(vramfx.load_state_dict(tmp_path))
    wrong["norm.weight"] = torch.zeros(3)
    with pytest.raises(vramfx.WeightsError, match=r"norm\.weight: stored \(3,\) float32, model expects \(64,\)"):
        vramfx.compile(build_empty(arch), budget="1GB", weights=wrong, device="cpu",
                       example_kwargs=arch.inputs())


def test_tied_weight_absent_from_the_checkpoint_takes_its_twin(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    eager = GPT2LMHeadModel(config).eval()
    eager.save_pretrained(tmp_path)
    weights = vramfx.DiskMap(tmp_path)
    assert "lm_head.weight" not in weights
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(input_ids=ids, use_cache=False).logits
    with vramfx.skip_model_initialization():
        empty = GPT2LMHeadModel(config).eval()
    budget = streaming_budget(empty, weights, {"input_ids": ids, "use_cache": False})
    fast = vramfx.compile(empty, budget=budget, weights=weights, device="cpu")
    assert torch.equal(expected, fast(input_ids=ids, use_cache=False).logits)
    assert fast.plan.streamed_bytes > 0
    tied = {w.name for w in fast.plan.weights} & {"transformer.wte.weight", "lm_head.weight"}
    assert len(tied) == 1, "one tensor, planned once, under one name"


def test_behaves_like_the_model(tmp_path):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget="16MiB", weights=tmp_path, device="cpu")
    assert isinstance(fast, torch.nn.Module)
    assert fast.config is empty.config
    assert fast.dtype == torch.float32
    assert fast.device == torch.device("cpu")
    assert fast.to("cpu") is fast
    with pytest.raises(ValueError, match="compile it again"):
        fast.to(torch.float16)
    out = fast(**arch.inputs())
    assert type(out).__name__ == "BaseModelOutputWithPast"
    assert not out.last_hidden_state.requires_grad


def test_real_parameters_stream_from_host_memory():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
    fast = vramfx.compile(model, budget=stack_budget(model, x), device="cpu", margin_bytes=2 * 2**20)
    assert torch.equal(expected, fast(x))
    assert torch.equal(expected, fast(x))
    assert fast.plan.streamed_bytes > 0
    assert model.layers[0].weight.device.type == "cpu", "compile leaves the model as it was"


def test_one_graph_per_input_signature_and_a_warning_after_eight():
    torch.manual_seed(0)
    model = Stack(width=8, depth=2).eval()
    fast = vramfx.compile(model, budget="16MiB", device="cpu")
    for batch in (1, 1, 2):
        x = torch.randn(batch, 8)
        assert torch.equal(model(x).detach(), fast(x))
    assert len(fast.compiled_graphs) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in range(3, 11):
            fast(torch.randn(batch, 8))
    messages = [str(w.message) for w in caught if "input signatures" in str(w.message)]
    assert len(messages) == 1


def test_inputs_on_another_device_are_refused():
    model = Stack(width=8, depth=1).eval()
    fast = vramfx.compile(model, budget="10MiB", device="cpu")
    with pytest.raises(ValueError, match=r"is on meta, but the model was compiled for cpu"):
        fast(torch.empty(2, 8, device="meta"))


def test_a_failed_read_names_the_node_and_the_next_call_works(tmp_path, monkeypatch):
    arch = ARCHS["llama"]
    build_saved(arch, tmp_path)
    weights = vramfx.DiskMap(tmp_path)
    inputs = arch.inputs()
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget=streaming_budget(empty, weights, inputs), weights=weights, device="cpu")
    expected = fast(**inputs)
    assert fast.plan.streamed_bytes > 0
    threads_before = threading.active_count()

    real_read = type(weights).read_into
    calls = {"n": 0}

    def failing_read(self, key, out, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(5, "Input/output error (injected)")
        return real_read(self, key, out, **kwargs)

    monkeypatch.setattr(type(weights), "read_into", failing_read)
    with pytest.raises(vramfx.WeightsError, match="injected") as info:
        fast(**inputs)
    assert any("compiled graph node" in note and "wait" in note for note in info.value.__notes__)
    monkeypatch.undo()
    assert torch.equal(expected.last_hidden_state, fast(**inputs).last_hidden_state)
    assert threading.active_count() == threads_before


def test_concurrent_calls_are_serialised():
    torch.manual_seed(0)
    model = Stack().eval()
    xs = [torch.randn(2, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    fast = vramfx.compile(model, budget=stack_budget(model, xs[0]), device="cpu", margin_bytes=2 * 2**20)
    expected = [model(x).detach() for x in xs]
    results: dict[int, torch.Tensor] = {}

    def call(i):
        for _ in range(5):
            results[i] = fast(xs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(expected[i], results[i]) for i in range(4))


def test_an_output_that_is_a_weight_is_copied_out_of_the_arena():
    class ReturnsWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x), self.b.weight

    torch.manual_seed(0)
    model = ReturnsWeight().eval()
    x = torch.randn(1, 16)
    with pytest.raises(vramfx.BudgetError) as info:
        vramfx.compile(model, budget=1, device="cpu", example_args=(x,))
    fast = vramfx.compile(model, budget=info.value.minimum_bytes, device="cpu")
    _, weight = fast(x)
    assert "b.weight" not in fast.plan.resident
    fast(torch.randn(1, 16))
    assert torch.equal(weight, model.b.weight.detach())


def test_page_cache_bypass_gives_the_same_result(tmp_path):
    arch = ARCHS["bert"]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    weights = vramfx.DiskMap(tmp_path)
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget=streaming_budget(empty, weights, inputs), weights=weights, device="cpu",
                          bypass_page_cache=True)
    assert torch.equal(expected, fast(**inputs).last_hidden_state)
    assert fast.plan.streamed_bytes > 0


class TokenMixer(torch.nn.Module):
    """An MLP-Mixer block: its token-mixing Linear reads a transposed, non-contiguous input."""

    def __init__(self, tokens: int = 5, channels: int = 8):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels)
        self.token_mix = torch.nn.Linear(tokens, tokens)
        self.channel_mix = torch.nn.Linear(channels, channels)

    def forward(self, x):
        x = x + self.token_mix(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(x)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_a_linear_on_a_non_contiguous_input_equals_eager(tmp_path, requires_grad):
    # matmul folds a non-contiguous batch into one mm only for weights that do not require grad,
    # even under no_grad; arena copies used to never require grad, so results differed in the
    # last bits from a model whose parameters do (the default).
    from safetensors.torch import save_model

    torch.manual_seed(0)
    eager = TokenMixer().eval().requires_grad_(requires_grad)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = eager(x)
    save_model(eager, str(tmp_path / "mixer.safetensors"))
    with vramfx.skip_model_initialization():
        empty = TokenMixer().eval().requires_grad_(requires_grad)
    for model, weights in ((eager, None), (empty, vramfx.DiskMap(tmp_path / "mixer.safetensors"))):
        with pytest.raises(vramfx.BudgetError) as info:
            vramfx.compile(model, budget=1, weights=weights, device="cpu", example_args=(x,))
        for budget in (info.value.minimum_bytes, 10 * info.value.minimum_bytes):  # streamed, resident
            fast = vramfx.compile(model, budget=budget, weights=weights, device="cpu")
            assert torch.equal(expected, fast(x))


# -- failures belong to one call; fallback belongs to one signature -------------------------------
def vramfx_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("vramfx.compile")]


def test_a_wrong_shaped_call_raises_as_eager_and_the_compiled_signature_keeps_its_graph(tmp_path):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    fast = vramfx.compile(build_empty(arch), budget="16MiB", weights=tmp_path, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(**inputs)
        bad = dict(inputs, input_ids=inputs["input_ids"][..., None].expand(1, 8, 3))
        with pytest.raises(RuntimeError) as info:
            fast(**bad)
        assert "eager raises it too" in "".join(info.value.__notes__)
        out = fast(**inputs)
    assert not vramfx_warnings(caught)
    assert fast.module_path is None and len(fast.compiled_graphs) == 1
    with torch.no_grad():
        assert torch.equal(eager(**inputs).last_hidden_state, out.last_hidden_state)
        with pytest.raises(RuntimeError):  # eager refuses the same call
            eager(**bad)


def test_a_hook_that_raises_once_is_raised_and_the_next_call_is_compiled():
    torch.manual_seed(0)
    model = Stack(width=8, depth=2).eval()
    raised = []

    def once(module, args):
        if not raised:
            raised.append(True)
            raise ValueError("hook failed (once)")

    model.layers[1].register_forward_pre_hook(once)
    fast = vramfx.compile(model, budget="10MiB", device="cpu")
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"hook failed \(once\)"):
            fast(x)
        out = fast(x)
    assert not vramfx_warnings(caught)
    assert fast.module_path is None and len(fast.compiled_graphs) == 1
    assert torch.equal(model(x).detach(), out)


class BranchesOnBigBatches(torch.nn.Module):
    """Data-dependent control flow on batches above 2 only: export expresses the small ones."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 4)

    def forward(self, x):
        h = self.proj(x)
        if x.shape[0] > 2 and h.sum() > 0:
            h = torch.relu(h)
        return self.out(h)


def test_fallback_is_for_the_signature_export_cannot_express_only():
    torch.manual_seed(0)
    model = BranchesOnBigBatches().eval()
    small, big = torch.randn(2, 16), torch.randn(4, 16)
    fast = vramfx.compile(model, budget="10MiB", device="cpu", example_args=(small,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [fast(x) for x in (small, big, small, big, small)]
    messages = vramfx_warnings(caught)
    assert len(messages) == 1 and "data-dependent" in messages[0] and "this input signature" in messages[0]
    for x, out in zip((small, big, small, big, small), outputs):
        assert torch.equal(model(x).detach(), out)
    assert len(fast.compiled_graphs) == 1
    assert fast.compiled_graphs[0].engine.active, "the latest (small) call ran its graph"
    assert fast.module_path.stats.calls == 2, "only the big calls ran module by module"


def test_a_nan_or_negative_zero_argument_gets_its_own_graph_once():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x, divisor: float):
            return self.proj(x) / divisor

    torch.manual_seed(0)
    model = Scale().eval()
    fast = vramfx.compile(model, budget="10MiB", device="cpu")
    x = torch.randn(2, 4)
    for divisor in (float("nan"), float("nan"), 0.0, -0.0, -0.0, 0.0):
        expected, actual = model(x, divisor).detach(), fast(x, divisor)
        assert torch.equal(expected.isnan(), actual.isnan())
        assert torch.equal(expected.nan_to_num(), actual.nan_to_num()), divisor
    assert len(fast.compiled_graphs) == 3, "nan, 0.0 and -0.0: one graph each"


# -- cache objects in a call's inputs and outputs -------------------------------------------------
def tiny_causal_lm() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a transformers causal LM takes its cache by (``cache`` from transformers 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def assert_same_cache(expected: object, actual: object) -> None:
    """Same cache class and layer classes, equal non-tensor attributes, tensors equal bit for bit."""
    assert type(actual) is type(expected) and len(actual.layers) == len(expected.layers)
    assert {k: v for k, v in vars(actual).items() if k != "layers"} == {k: v for k, v in vars(expected).items() if k != "layers"}
    for e, a in zip(expected.layers, actual.layers):
        assert type(a) is type(e) and vars(a).keys() == vars(e).keys()
        for name, value in vars(e).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, vars(a)[name]), name
            else:
                assert vars(a)[name] == value, name


def test_a_causal_lm_called_with_its_cache_stays_compiled_and_equals_eager(tmp_path):
    torch.manual_seed(0)
    eager = tiny_causal_lm().eval()
    eager.save_pretrained(tmp_path)
    with vramfx.skip_model_initialization():
        empty = tiny_causal_lm().eval()
    name = cache_argument(eager)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    step = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prompt = eager(input_ids=ids)  # use_cache=True by default: the output holds a DynamicCache
        expected_cache = prompt[name]
        decoded = eager(input_ids=step, **{name: expected_cache})
        no_cache = eager(input_ids=ids, use_cache=False)
    budget = streaming_budget(empty, vramfx.DiskMap(tmp_path), {"input_ids": ids})
    with torch.no_grad():  # room for the two further graphs (decoding with the cache, no cache)
        budget += further_graph_bytes(empty, {"input_ids": step, name: eager(input_ids=ids)[name]})
    budget += further_graph_bytes(empty, {"input_ids": ids, "use_cache": False})
    fast = vramfx.compile(empty, budget=budget, weights=tmp_path, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(input_ids=ids)
        cache = out[name]
        assert torch.equal(prompt.logits, out.logits)
        # The prompt's cache is compared after eager's decoding step appended to both.
        out_step = fast(input_ids=step, **{name: cache})
        out_no_cache = fast(input_ids=ids, use_cache=False)
    assert not vramfx_warnings(caught), "no fallback"
    assert fast.module_path is None and len(fast.compiled_graphs) == 3
    assert out_step[name] is cache, "the cache passed in is the one returned, changed in place as eager does"
    assert torch.equal(decoded.logits, out_step.logits)
    assert_same_cache(expected_cache, cache)
    assert torch.equal(no_cache.logits, out_no_cache.logits) and getattr(out_no_cache, name) is None
    assert fast.plan.streamed_bytes > 0


def test_an_empty_cache_passed_in_is_filled_as_eager_fills_it(tmp_path):
    from transformers import DynamicCache

    torch.manual_seed(0)
    eager = tiny_causal_lm().eval()
    eager.save_pretrained(tmp_path)
    with vramfx.skip_model_initialization():
        empty = tiny_causal_lm().eval()
    name = cache_argument(eager)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    expected_cache, cache = DynamicCache(config=eager.config), DynamicCache(config=eager.config)
    with torch.no_grad():
        expected = eager(input_ids=ids, **{name: expected_cache})
    fast = vramfx.compile(empty, budget="16MiB", weights=tmp_path, device="cpu")
    out = fast(input_ids=ids, **{name: cache})
    assert torch.equal(expected.logits, out.logits)
    assert out[name] is cache
    assert_same_cache(expected_cache, cache)
    assert fast.module_path is None


# -- the nn.Module surface ----------------------------------------------------------------------
def test_state_dict_reads_the_stored_weights_under_the_models_names(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    eager = GPT2LMHeadModel(config).eval()
    eager.save_pretrained(tmp_path)
    with vramfx.skip_model_initialization():
        empty = GPT2LMHeadModel(config).eval()
    fast = vramfx.compile(empty, budget="16MiB", weights=tmp_path, device="cpu")
    expected = eager.state_dict()
    state = fast.state_dict()
    assert list(state) == list(expected), "every name, tied ones included, in the model's order"
    assert all(torch.equal(expected[k], state[k]) for k in expected)
    assert state["lm_head.weight"] is state["transformer.wte.weight"], "tied weights are one tensor"
    assert list(fast.state_dict(prefix="m.")) == ["m." + k for k in expected]
    half = vramfx.compile(empty, budget="16MiB", weights=tmp_path, device="cpu", compute_dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.state_dict().values() if v.is_floating_point())


def test_the_module_surface_refuses_what_a_compiled_model_cannot_do():
    import copy
    import pickle

    model = Stack(width=8, depth=1).eval()
    fast = vramfx.compile(model, budget="10MiB", device="cpu")
    for convert in (fast.half, fast.bfloat16, fast.double):
        with pytest.raises(ValueError, match=r"compiled for torch.float32; compile it again with compute_dtype="):
            convert()
    with pytest.raises(ValueError, match=r"compiled for cpu; compile it again with device='cuda"):
        fast.cuda()
    assert fast.float() is fast and fast.cpu() is fast and fast.eval() is fast
    with pytest.raises(TypeError, match="compile again with weights="):
        fast.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match="cannot be copied.*Compile the model again"):
        copy.deepcopy(fast)
    with pytest.raises(TypeError, match="cannot be pickled.*call vramfx.compile where it is unpickled"):
        pickle.dumps(fast)
    with pytest.raises(TypeError, match="inference only"):
        fast.train()
    with pytest.raises(TypeError, match="compile the model again"):
        fast.share_memory()
    x = torch.randn(2, 8)
    assert torch.equal(model(x).detach(), fast(x)), "nothing refused changed the model"


def test_release_can_keep_resident_weights_and_replan_keeps_the_capture():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = model(x)
    fast = vramfx.compile(model, budget="64MiB", device="cpu", example_args=(x,))
    assert torch.equal(fast(x), expected)
    resident = set(fast.plan.resident)
    assert resident
    store = fast.__dict__["_vramfx_store"]
    fast.release(keep_resident=True)
    assert all(name in store for name in resident)
    fast.release()
    assert not any(name in store for name in resident)
    captured = fast.compiled_graphs[0].captured
    fast.replan()
    assert fast.compiled_graphs[0].captured is captured and fast.plan is fast.compiled_graphs[0].plan
    assert torch.equal(fast(x), expected)
