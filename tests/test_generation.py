"""A causal LM called as transformers calls it, and ``generate``, on captured graphs: equal to eager,
no module-path fallback, the process within the budget.

transformers takes other branches while it is traced than in eager with a static cache (an
explicit mask over the whole cache instead of a causal kernel over the filled part), so the
compiled path's logits may differ from eager's in the last bits; greedy tokens are equal, and the
default call (dynamic cache, carried through the graph) is bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vramfx
from pretrained_folders import save_causal_lm
from tiny_models import further_graph_bytes
from vramfx.measure import PeakMemory, release_freed_memory

PROMPT = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def export_state_paid() -> None:
    """torch.export's one-time process state is not the model's: an earlier compile pays it."""
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)


@pytest.fixture
def saved_lm(tmp_path):
    eager = save_causal_lm(tmp_path)
    for p in eager.parameters():  # weights in torch's memory, not views into the mapped file
        p.data = p.data.clone()
    return tmp_path, eager


def lm_budget(folder, eager) -> int:
    """The smallest budget for the prompt's call, room for a second graph as large (compile sets
    aside the host memory each further graph holds), and half the weights: the rest streams."""
    from transformers import LlamaForCausalLM

    with pytest.raises(vramfx.BudgetError) as info:
        vramfx.from_pretrained(LlamaForCausalLM, folder, budget=1, device="cpu", example_kwargs={"input_ids": PROMPT})
    with vramfx.skip_model_initialization():
        empty = LlamaForCausalLM(eager.config).eval()
    second = 2 * further_graph_bytes(empty, {"input_ids": PROMPT})
    return info.value.minimum_bytes + second + sum(p.nbytes for p in eager.parameters()) // 2


def test_the_default_call_and_the_next_step_stay_on_graphs(saved_lm, export_state_paid):
    from transformers import LlamaForCausalLM

    folder, eager = saved_lm
    with torch.no_grad():
        first = eager(input_ids=PROMPT)
        step = eager(input_ids=PROMPT[:, -1:], past_key_values=first.past_key_values)
    budget = lm_budget(folder, eager)
    release_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warns: none may happen
        with PeakMemory("cpu") as peak:
            fast = vramfx.from_pretrained(LlamaForCausalLM, folder, budget=budget, device="cpu")
            out = fast(input_ids=PROMPT)
            out_step = fast(input_ids=PROMPT[:, -1:], past_key_values=out.past_key_values)
    assert peak.growth_bytes <= budget, (peak.growth_bytes, budget)
    assert torch.equal(first.logits, out.logits) and torch.equal(step.logits, out_step.logits)
    assert type(out.past_key_values) is type(first.past_key_values)
    assert fast.module_path is None and len(fast.compiled_graphs) == 2
    assert fast.plan.streamed_bytes > 0


def test_generate_runs_decode_steps_on_one_graph(saved_lm, export_state_paid):
    from transformers import LlamaForCausalLM

    folder, eager = saved_lm
    expected_static = eager.generate(PROMPT, max_new_tokens=10, do_sample=False, cache_implementation="static",
                                     return_dict_in_generate=True, output_logits=True)
    expected_dynamic = eager.generate(PROMPT, max_new_tokens=10, do_sample=False)
    budget = lm_budget(folder, eager)
    release_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with PeakMemory("cpu") as peak:
            fast = vramfx.from_pretrained(LlamaForCausalLM, folder, budget=budget, device="cpu")
            out = fast.generate(PROMPT, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
            again = fast.generate(PROMPT, max_new_tokens=10, do_sample=False)
    # The static cache the prompt's graph returns is the caller's, as eager's is: keys and values,
    # 2 layers x 2 heads x 64 x 16 positions x 4 bytes, beside the budget.
    cache_bytes = 2 * 2 * 2 * 64 * 16 * 4
    assert peak.growth_bytes <= budget + cache_bytes, (peak.growth_bytes, budget)
    assert torch.equal(expected_static.sequences, out.sequences)
    assert torch.equal(expected_dynamic, out.sequences) and torch.equal(expected_dynamic, again)
    for want, got in zip(expected_static.logits, out.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # One graph for the prompt, one for every decoding step; no module path.
    assert fast.module_path is None and len(fast.compiled_graphs) == 2
    assert fast.plan.streamed_bytes > 0


def test_a_chosen_cache_is_used_as_asked(saved_lm, export_state_paid):
    from transformers import LlamaForCausalLM

    folder, eager = saved_lm
    expected = eager.generate(PROMPT, max_new_tokens=3, do_sample=False, use_cache=False)
    fast = vramfx.from_pretrained(LlamaForCausalLM, folder, budget="64MiB", device="cpu")
    assert torch.equal(expected, fast.generate(PROMPT, max_new_tokens=3, do_sample=False, use_cache=False))
    assert len(fast.compiled_graphs) == 3  # no cache: a new prompt length every step


def test_generate_on_a_model_without_it_is_an_attribute_error():
    fast = vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu")
    with pytest.raises(AttributeError, match="Linear has no generate"):
        fast.generate(torch.ones(1, 2))
