"""compile's fallback: models export cannot capture run module by module, and generate() works."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vramfx


class Branches(torch.nn.Module):
    """Its forward takes a branch by a tensor's value, which export cannot capture."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.up = torch.nn.Linear(width, width)
        self.up_more = torch.nn.Linear(width, width)
        self.down = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 16)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:
            h = self.up_more(torch.relu(self.up(h)))
        else:
            h = self.down(torch.tanh(h))
        return self.out(h)


def vramfx_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("vramfx.compile")]


def test_data_dependent_branches_fall_back_with_one_warning_and_equal_eager(tmp_path):
    torch.manual_seed(0)
    eager = Branches().eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        empty = Branches().eval()
    inputs = [torch.randn(4, 512, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        branch = [bool(eager.proj(x).sum() > 0) for x in inputs]
        expected = [eager(x) for x in inputs]
    assert any(branch) and not all(branch), "the inputs take both branches"

    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    margin = 2**20
    budget = margin + weight_bytes // 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = vramfx.compile(empty, budget=budget, weights=tmp_path, device="cpu", margin_bytes=margin,
                              example_args=(inputs[0],))
        outputs = [fast(x) for x in inputs + inputs]
    messages = vramfx_warnings(caught)
    assert len(messages) == 1, messages
    assert "could not capture Branches" in messages[0] and "module by module" in messages[0]
    for e, out in zip(expected + expected, outputs):
        assert torch.equal(e, out)
    stats = fast.module_path.stats
    assert stats.fetched_bytes > 0 and stats.resident_bytes < weight_bytes, "under the budget modules stream"
    assert stats.held_peak_bytes <= budget - margin


def test_a_changed_branch_costs_synchronous_fetches_not_a_wrong_result(tmp_path):
    torch.manual_seed(0)
    eager = Branches().eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        empty = Branches().eval()
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flipped = -x if eager.proj(x).sum() * eager.proj(-x).sum() < 0 else None
    assert flipped is not None
    # Room for about one and a half of the large modules: most of them stream.
    largest = 512 * 512 * 4 + 512 * 4
    fast = vramfx.compile(empty, budget=largest * 3 // 2 + 2**20, weights=tmp_path, device="cpu",
                          margin_bytes=2**20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # record; load the kept modules; steady
            fast(x)
    steady = fast.module_path.stats
    assert steady.fetched_bytes > 0 and steady.synchronous == 0, "the recorded order is fetched ahead"
    with torch.no_grad():
        assert torch.equal(fast(flipped), eager(flipped))
    stats = fast.module_path.stats
    assert stats.synchronous > 0, "the module off the recorded order was fetched synchronously"
    with torch.no_grad():
        assert torch.equal(fast(flipped), eager(flipped))
    assert fast.module_path.stats.synchronous < stats.synchronous, "the new order is followed"


def test_a_budget_below_the_module_path_minimum_is_refused(tmp_path):
    torch.manual_seed(0)
    save_file(Branches().state_dict(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        empty = Branches().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = vramfx.compile(empty, budget="1MB", weights=tmp_path, device="cpu", margin_bytes=0)
        with pytest.raises(vramfx.BudgetError, match=r"module by module .* pass budget >=") as info:
            fast(torch.randn(2, 512))
    assert info.value.minimum_bytes >= 512 * 512 * 4


def causal_lm(kind: str) -> torch.nn.Module:
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, **special))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=256, n_layer=2, n_head=4, n_positions=64, **special))


def saved_causal_lm(kind: str, folder) -> tuple:
    """The eager model saved to ``folder``, the same built empty, a prompt, eager's greedy tokens."""
    torch.manual_seed(0)
    eager = causal_lm(kind).eval()
    eager.save_pretrained(folder)
    with vramfx.skip_model_initialization():
        empty = causal_lm(kind).eval()
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    return eager, empty, ids, eager.generate(ids, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_on_the_module_path_gives_eager_tokens_with_the_kv_cache(kind, tmp_path):
    """The module path's generate (a model transformers cannot give a static cache, or a step
    export cannot express): each step fetches weights ahead along the recorded module order."""
    from vramfx.swap.fallback import ModulePath

    eager, empty, ids, expected = saved_causal_lm(kind, tmp_path)

    steps = []

    def note_step(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        steps.append((kwargs["input_ids"].shape[1], cached))

    empty.register_forward_pre_hook(note_step, with_kwargs=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    margin = 2**20
    budget = margin + weight_bytes // 2
    path = ModulePath(empty, vramfx.DiskMap(tmp_path), device=torch.device("cpu"), budget_bytes=budget,
                      margin_bytes=margin, calls=10)
    first = path.generate(ids, max_new_tokens=6, do_sample=False)
    second = path.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, first) and torch.equal(expected, second)
    # The prompt once, then one token per step on top of the cache.
    assert steps[:6] == [(6, 0), (1, 6), (1, 7), (1, 8), (1, 9), (1, 10)]
    stats = path.stats
    assert stats.fetched_bytes > 0 and stats.prefetched > 0, "decoding streams weights, fetched ahead"
    assert stats.held_peak_bytes <= budget - margin
    assert all(p.is_meta for p in empty.parameters()), "the model is left with its meta parameters"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compiled_generate_gives_eager_tokens_on_graphs(kind, tmp_path):
    eager, empty, ids, expected = saved_causal_lm(kind, tmp_path)
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    fast = vramfx.compile(empty, budget=32 * 2**20 + weight_bytes // 2, weights=vramfx.DiskMap(tmp_path), device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fast.generate(ids, max_new_tokens=6, do_sample=False)
        second = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert not vramfx_warnings(caught), "no fallback"
    assert torch.equal(expected, first) and torch.equal(expected, second)
    assert fast.module_path is None and len(fast.compiled_graphs) == 2, "the prompt's graph and the steps' graph"
    assert all(p.is_meta for p in empty.parameters()), "the model is left with its meta parameters"


class Gated(torch.nn.Module):
    """A block owning a parameter of its own around a child: its weights span the child's call."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(width))
        self.inner = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.inner(x)) * self.scale


class Nested(torch.nn.Module):
    def __init__(self, width: int = 64, depth: int = 5):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Gated(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            if x.sum() > 0:  # which blocks run depends on the values
                x = block(x)
            x = -x
        return x


@given(seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=5), room=st.floats(0.0, 1.2))
@settings(max_examples=30)
def test_nested_modules_and_changing_orders_equal_eager_within_the_budget(nested_saved, seeds, room):
    from vramfx.swap.fallback import ModulePath

    eager, path = nested_saved
    with vramfx.skip_model_initialization():
        model = Nested().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    block_bytes = weight_bytes // len(eager.blocks)
    margin = 2**20
    budget = 2 * margin + block_bytes + int(room * weight_bytes)  # a margin more for activations
    path_ = ModulePath(model, vramfx.DiskMap(path), device=torch.device("cpu"), budget_bytes=budget,
                       margin_bytes=margin, calls=10)
    for seed in seeds:
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(eager(x), path_(x))
    assert path_.stats.held_peak_bytes <= budget - margin
    assert all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def nested_saved(tmp_path_factory):
    torch.manual_seed(0)
    eager = Nested().eval()
    path = tmp_path_factory.mktemp("nested") / "model.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path
