"""A stack of identical blocks captured once equals the whole-model capture: the same ops on the
same values, the same outputs bit for bit, and the whole export whenever the reuse is not valid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vramfx
import vramfx.capture_blocks as capture_blocks
from tiny_models import ARCHS, Arch, assert_same_output, build_empty, build_saved
from vramfx.capture import capture
from vramfx.plan.liveness import tensors_of


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )


def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32,
    )


STACKED = {
    "flux": dataclasses.replace(ARCHS["flux"], build=_flux),
    "wan": dataclasses.replace(ARCHS["wan"], build=_wan),
    "unet": ARCHS["unet"],
    "llama": ARCHS["llama"],
}
#: Which groups each architecture's capture reuses a block graph for (Llama's layers differ in
#: ``layer_idx``, so they are captured one by one).
SPLICED = {
    "flux": ["transformer_blocks", "single_transformer_blocks"],
    "wan": ["blocks"],
    "unet": ["up_blocks.1.attentions", "mid_block.resnets"],
    "llama": [],
}


@pytest.fixture
def spliced(monkeypatch):
    """The prefixes of the groups each capture spliced, in order."""
    seen: list[list[str]] = []
    original = capture_blocks._splice

    def spy(exported, groups):
        seen.append([g.prefix for g in groups])
        return original(exported, groups)

    monkeypatch.setattr(capture_blocks, "_splice", spy)
    return seen


def _capture_both(arch: Arch, monkeypatch):
    model = build_empty(arch)
    inputs = arch.inputs()
    monkeypatch.setenv(capture_blocks.ENV_SWITCH, "1")
    reused = capture(model, (), inputs)
    monkeypatch.setenv(capture_blocks.ENV_SWITCH, "0")
    whole = capture(model, (), inputs)
    return reused, whole


def _meta(node: torch.fx.Node) -> list[tuple]:
    return [(tuple(t.shape), t.stride(), t.dtype) for t in tensors_of(node.meta.get("val"))]


def _module_paths(node: torch.fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


@pytest.mark.parametrize("name", list(STACKED))
def test_spliced_graph_is_the_whole_models(name, monkeypatch, spliced):
    reused, whole = _capture_both(STACKED[name], monkeypatch)
    assert spliced == ([SPLICED[name]] if SPLICED[name] else [])
    a, b = list(reused.graph_module.graph.nodes), list(whole.graph_module.graph.nodes)
    assert [(n.op, n.target) for n in a] == [(n.op, n.target) for n in b]
    assert [_meta(n) for n in a] == [_meta(n) for n in b]
    assert [_module_paths(n) for n in a] == [_module_paths(n) for n in b]
    assert [dataclasses.replace(w, value=None) for w in reused.weights] == [
        dataclasses.replace(w, value=None) for w in whole.weights
    ]
    assert (reused.in_spec, reused.out_spec) == (whole.in_spec, whole.out_spec)


@pytest.mark.parametrize("name", list(STACKED))
def test_spliced_graph_runs_equal_to_eager_and_to_the_whole_capture(name, tmp_path, monkeypatch, spliced):
    arch = STACKED[name]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(tmp_path)
    plans = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(capture_blocks.ENV_SWITCH, switch)
        fast = vramfx.compile(build_empty(arch), budget="1GB", weights=weights, device="cpu", cache=False)
        assert_same_output(expected, fast(**inputs))
        plans[switch] = fast.plan
    assert spliced == ([SPLICED[name]] if SPLICED[name] else [])
    assert plans["1"].summary() == plans["0"].summary()


def test_every_sibling_gets_its_own_weights_and_as_many_nodes(monkeypatch, spliced):
    reused, _ = _capture_both(STACKED["wan"], monkeypatch)
    per_block: dict[str, int] = {}
    weights_read: dict[str, set[str]] = {}
    placeholder_weight = {p: w.name for w in reused.weights for p in w.placeholders}
    for node in reused.graph_module.graph.nodes:
        blocks = [p for p in _module_paths(node) if p.count(".") == 1 and p.startswith("blocks.")]
        if not blocks:
            continue
        per_block[blocks[0]] = per_block.get(blocks[0], 0) + 1
        for arg in node.all_input_nodes:
            if arg.name in placeholder_weight:
                weights_read.setdefault(blocks[0], set()).add(placeholder_weight[arg.name])
    assert sorted(per_block) == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(set(per_block.values())) == 1
    for block, names in weights_read.items():
        assert names and all(n.startswith(block + ".") for n in names), block


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) + x


class _Stack(torch.nn.Module):
    def __init__(self, widths=(8, 8, 8), calls=(0, 1, 2)) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(w) for w in widths)
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.calls:
            x = self.blocks[index](x)
        return x


def _check_stack(model: torch.nn.Module, monkeypatch, spliced, expect_splice: bool, width: int = 8) -> None:
    x = torch.randn(2, width)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setenv(capture_blocks.ENV_SWITCH, "1")
    fast = vramfx.compile(model, budget="64MiB", device="cpu", cache=False)
    assert torch.equal(fast(x), expected)
    assert bool(spliced) == expect_splice


def test_a_plain_stack_is_spliced(monkeypatch, spliced):
    _check_stack(_Stack(), monkeypatch, spliced, expect_splice=True)


def test_blocks_with_other_parameters_are_captured_whole(monkeypatch, spliced):
    model = _Stack()
    model.blocks[1].linear = torch.nn.Linear(8, 8, bias=False)
    _check_stack(model, monkeypatch, spliced, expect_splice=False)


def test_a_block_called_twice_is_captured_whole(monkeypatch, spliced):
    _check_stack(_Stack(calls=(0, 1, 1, 2)), monkeypatch, spliced, expect_splice=False)


def test_a_block_skipped_on_this_call_is_captured_whole(monkeypatch, spliced):
    _check_stack(_Stack(calls=(0, 2)), monkeypatch, spliced, expect_splice=False)


def test_a_block_with_a_hook_is_captured_whole(monkeypatch, spliced):
    model = _Stack()
    model.blocks[1].register_forward_hook(lambda module, args, out: out * 2)
    _check_stack(model, monkeypatch, spliced, expect_splice=False)


def test_blocks_whose_inputs_differ_in_shape_are_captured_whole(monkeypatch, spliced):
    class Stack(_Stack):
        def forward(self, x):
            x = self.blocks[0](x)
            x = self.blocks[1](torch.cat([x, x]))
            return self.blocks[2](x)

    _check_stack(Stack(), monkeypatch, spliced, expect_splice=False)


def test_data_dependent_blocks_fall_back_as_the_whole_capture_does(monkeypatch, spliced):
    class Block(_Block):
        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else x

    model = _Stack()
    model.blocks = torch.nn.ModuleList(Block(8) for _ in range(3))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning):
        fast = vramfx.compile(model, budget="64MiB", device="cpu", cache=False)
        assert torch.equal(fast(x), expected)
    assert not spliced


def test_the_switch_turns_it_off(monkeypatch, spliced):
    monkeypatch.setenv(capture_blocks.ENV_SWITCH, "0")
    capture(_Stack(), (torch.randn(2, 8),))
    assert not spliced


@pytest.mark.slow
def test_a_40_block_wan_spliced_equals_eager_and_the_whole_capture(tmp_path, monkeypatch, spliced):
    from diffusers import WanTransformer3DModel

    def build():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=40, rope_max_seq_len=32,
        )

    arch = dataclasses.replace(ARCHS["wan"], build=build)
    reused, whole = _capture_both(arch, monkeypatch)
    a, b = list(reused.graph_module.graph.nodes), list(whole.graph_module.graph.nodes)
    assert [(n.op, n.target) for n in a] == [(n.op, n.target) for n in b]
    assert [_meta(n) for n in a] == [_meta(n) for n in b]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    for switch in ("1", "0"):
        monkeypatch.setenv(capture_blocks.ENV_SWITCH, switch)
        fast = vramfx.compile(build_empty(arch), budget="1GB", weights=vramfx.DiskMap(tmp_path), device="cpu",
                              cache=False)
        assert_same_output(expected, fast(**inputs))
    assert spliced == [["blocks"], ["blocks"]]


def test_blocks_called_under_autocast_are_captured_whole(monkeypatch, spliced):
    class Stack(_Stack):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for block in self.blocks:
                    x = block(x)
            return x.float()

    _check_stack(Stack(), monkeypatch, spliced, expect_splice=False)
