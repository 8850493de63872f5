"""Constant attention masks: folded into SDPA's flags as eager passes them, anything else kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tiny_models import ARCHS, build_empty
from vramfx.capture import capture
from vramfx.fold_masks import fold_constant_masks

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def sdpa_calls(captured) -> list:
    return [n for n in captured.graph_module.graph.nodes if n.target is SDPA]


def recorded_sdpa_calls(model: torch.nn.Module, inputs: dict) -> list[tuple[bool, bool]]:
    """(has a mask, is_causal) of every SDPA call eager makes."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        calls.append((mask is not None, bool(kwargs.get("is_causal", False))))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return calls


def test_a_causal_lm_without_padding_captures_is_causal_as_eager_calls_it():
    arch = ARCHS["llama"]
    torch.manual_seed(0)
    eager_calls = recorded_sdpa_calls(arch.build().eval(), arch.inputs())
    assert eager_calls and all(call == (False, True) for call in eager_calls)
    captured = capture(build_empty(arch), (), arch.inputs())
    calls = sdpa_calls(captured)
    assert len(calls) == len(eager_calls)
    for node in calls:
        assert len(node.args) == 3 and node.kwargs.get("attn_mask") is None
        assert node.kwargs["is_causal"] is True
    # The mask's construction left the graph with it.
    assert not any(n.target is torch.ops.aten.cumsum.default for n in captured.graph_module.graph.nodes)


def test_a_padding_mask_given_as_input_is_kept():
    arch = ARCHS["llama"]
    inputs = dict(arch.inputs())
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 0] = 0
    captured = capture(build_empty(arch), (), {**inputs, "attention_mask": mask})
    calls = sdpa_calls(captured)
    assert calls and all(isinstance(n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask"), torch.fx.Node)
                         for n in calls)


class Attention(torch.nn.Module):
    """One SDPA call with a mask built from shapes only."""

    def __init__(self, make_mask):
        super().__init__()
        self.make_mask = make_mask

    def forward(self, q, k, v):
        mask = self.make_mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fold(make_mask, queries=8, keys=8) -> tuple[int, torch.fx.GraphModule]:
    q = torch.randn(1, 2, queries, 4)
    k = v = torch.randn(1, 2, keys, 4)
    captured = capture(Attention(make_mask), (q, k, v))
    # capture folded what it could already; a second pass finds nothing left to fold.
    assert fold_constant_masks(captured.graph_module) == 0
    return captured


def test_constant_causal_and_all_visible_masks_fold_and_outputs_stay_equal():
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    for make_mask, causal in (
        (lambda n, m, d: torch.ones(n, m, dtype=torch.bool, device=d).tril(), True),
        (lambda n, m, d: torch.ones(n, m, dtype=torch.bool, device=d), False),
        (lambda n, m, d: torch.zeros(n, m, device=d), False),
    ):
        captured = fold(make_mask)
        (node,) = sdpa_calls(captured)
        assert node.kwargs["is_causal"] is causal and node.kwargs.get("attn_mask") is None
        out = captured.graph_module(q, k, v)[0]
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(out, expected)


def test_other_constant_masks_are_kept():
    def sliding(n, m, d):  # a window of 2 keys: constant, but neither causal nor all visible
        i = torch.arange(n, device=d)[:, None]
        j = torch.arange(m, device=d)[None, :]
        return (j <= i) & (j > i - 2)

    def causal_offset(n, m, d):  # causal with more keys than queries: not SDPA's is_causal
        return torch.ones(n, m, dtype=torch.bool, device=d).tril()

    for make_mask, keys in ((sliding, 8), (causal_offset, 12)):
        captured = fold(make_mask, keys=keys)
        (node,) = sdpa_calls(captured)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        assert isinstance(mask, torch.fx.Node)
