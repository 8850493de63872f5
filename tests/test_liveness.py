"""liveness: weight uses, view spans and the activation profile of small hand-checked graphs."""

from __future__ import annotations

import torch

from tiny_models import ARCHS, build_empty
from vramfx.capture import capture
from vramfx.plan.liveness import build_graph, build_liveness, compute_nodes


class Chain(torch.nn.Module):
    """x → a → relu → b → relu, then a read of ``a.weight`` through a view at the very end."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8, bias=False)
        self.b = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        return h + self.a.weight.t()[0]


def test_uses_and_spans_follow_views_of_a_weight():
    captured = capture(Chain(), (torch.randn(4, 8),))
    live = build_liveness(captured)
    names = [n.name for n in compute_nodes(captured.graph_module.graph)]
    a, b = live.name_to_weight["a.weight"], live.name_to_weight["b.weight"]
    assert b.uses == (names.index("linear_1"),)
    # a.weight: read by the first linear, then viewed (t, select) and read by the final add.
    assert a.first_use == names.index("linear")
    view = names.index("t")
    assert a.last_use == names.index("add")
    assert a.spans[0] == (names.index("linear"), names.index("linear") + 1)
    assert a.spans[-1][0] == view and a.spans[-1][1] == names.index("add") + 1
    assert a.nbytes == 8 * 8 * 4 and a.shape == (8, 8) and a.dtype == "float32"


def test_activation_profile_counts_each_storage_once_over_its_half_open_range():
    captured = capture(Chain(), (torch.randn(4, 8),))
    live = build_liveness(captured)
    names = [n.name for n in compute_nodes(captured.graph_module.graph)]
    act = 4 * 8 * 4  # one [4, 8] float32 activation
    # While the first linear runs: the input x and its output are alive.
    assert live.activation_bytes[names.index("linear")] == 2 * act
    # The final add reads h and a view of a weight (not an activation) and writes the output.
    assert live.activation_bytes[names.index("add")] == 2 * act
    assert live.activation_peak_bytes == max(live.activation_bytes)
    assert len(live.activation_bytes) == live.num_positions == len(names)


def test_costs_count_matmul_flops():
    captured = capture(Chain(), (torch.randn(4, 8),))
    live = build_liveness(captured)
    names = [n.name for n in compute_nodes(captured.graph_module.graph)]
    assert live.flops[names.index("linear")] == 2 * 4 * 8 * 8
    assert live.memory_bytes[names.index("t")] == 0, "a view moves no bytes"


def test_real_model_weights_in_first_use_order_with_the_networkx_graph():
    arch = ARCHS["llama"]
    captured = capture(build_empty(arch), (), arch.inputs())
    live = build_liveness(captured)
    first_uses = [w.first_use for w in live.weights]
    assert first_uses == sorted(first_uses)
    assert live.weights[0].name == "embed_tokens.weight"
    assert {w.name for w in live.weights} >= {"norm.weight", "layers.1.mlp.down_proj.weight"}
    dag = build_graph(captured.graph_module.graph)
    assert dag.number_of_nodes() == len(captured.graph_module.graph.nodes)
    assert all(0 <= u < live.num_positions for w in live.weights for u in w.uses)


def test_cpu_attention_reserves_workspace_for_the_score_matrix():
    arch = ARCHS["llama"]
    captured = capture(build_empty(arch), (), arch.inputs())
    # batch 1, 4 heads, 8 queries × 8 keys, float32
    assert build_liveness(captured, device="cpu").workspace_bytes >= 4 * 8 * 8 * 4


def test_a_weight_stored_low_is_sized_in_storage_and_its_casts_cost_traffic():
    captured = capture(Chain(), (torch.randn(4, 8),))
    plain = build_liveness(captured)
    live = build_liveness(captured, storage_dtypes={"a.weight": torch.float8_e4m3fn})
    a, b = live.name_to_weight["a.weight"], live.name_to_weight["b.weight"]
    assert (a.nbytes, a.dtype, a.compute_dtype, a.compute_nbytes) == (64, "float8_e4m3fn", "float32", 256)
    assert (b.nbytes, b.compute_dtype, b.compute_nbytes) == (256, None, 0)
    assert a.spans == plain.name_to_weight["a.weight"].spans and len(a.spans) == 2
    assert live.activation_bytes == plain.activation_bytes, "upcast buffers are placed by the schedule"
    starts = {begin for begin, _ in a.spans}
    for t in range(live.num_positions):
        extra = 64 + 256 if t in starts else 0  # each cast reads the stored bytes, writes the copy
        assert live.memory_bytes[t] == plain.memory_bytes[t] + extra
