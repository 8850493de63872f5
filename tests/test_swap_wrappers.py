"""The wrappers' contract: non-recursive blocks, the whole-model wrap, states, attributes, LoRA, fp8."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import vramfx
from vramfx.swap import (
    AutoWrappedLinear,
    AutoWrappedModule,
    AutoWrappedNonRecurseModule,
    enable_vram_management,
    offload,
    onload,
    swap_stats,
)
from vramfx.swap.linear_ops import fp8_linear

WIDTH = 16
X = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
DISK = dict(offload_dtype="disk", offload_device="disk", onload_dtype=torch.float32, onload_device="cpu",
            preparing_dtype=torch.bfloat16, computation_dtype=torch.float32, computation_device="cpu")


class Block(torch.nn.Module):
    """A block with a parameter of its own beside its layers, as a DiT block's modulation table."""

    def __init__(self):
        super().__init__()
        self.modulation = torch.nn.Parameter(torch.randn(WIDTH))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.heads = 2

    def forward(self, x):
        return x + self.proj(self.norm(x)) * self.modulation


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(WIDTH, WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        self.head = torch.nn.Linear(WIDTH, WIDTH)
        self.patch_size = (1, 2, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


BLOCK_MAP = {Block: AutoWrappedNonRecurseModule, torch.nn.Linear: AutoWrappedLinear, torch.nn.LayerNorm: AutoWrappedModule}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    eager = Net().eval()
    path = tmp_path_factory.mktemp("net") / "model.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path


def empty() -> Net:
    with vramfx.skip_model_initialization():
        return Net().eval()


def test_a_non_recursive_block_moves_its_own_weights_and_its_layers_are_wrapped_in_turn(saved):
    eager, path = saved
    model = enable_vram_management(empty(), BLOCK_MAP, DISK, vram_limit="4KiB", disk_map=vramfx.DiskMap(path))
    block = model.blocks[0]
    assert isinstance(block, AutoWrappedNonRecurseModule) and isinstance(block.module.proj, AutoWrappedLinear)
    assert [s.name for s in block._vramfx_unit.slots] == ["blocks.0.modulation"]
    assert block.heads == 2 and block.name == "blocks.0", "attributes come from the wrapped block"
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(eager(X), model(X))
    assert swap_stats(model).order[:4] == ("embed", "blocks.0", "blocks.0.norm", "blocks.0.proj")


def test_a_model_the_map_matches_is_wrapped_whole(saved):
    eager, path = saved
    wrapper = enable_vram_management(empty(), {Net: AutoWrappedModule}, DISK, disk_map=vramfx.DiskMap(path))
    assert isinstance(wrapper, AutoWrappedModule) and wrapper.vram_management_enabled
    assert wrapper.patch_size == (1, 2, 2), "attributes come from the wrapped model"
    with torch.no_grad():
        assert torch.equal(eager(X), wrapper(X))
        onload(wrapper)  # onload is computation for a whole model: its layers can be called directly
        assert torch.equal(eager.blocks[1](X), wrapper.blocks[1](X))
    assert wrapper.state == 1 and swap_stats(wrapper).order == ("Net",)
    with pytest.raises(ValueError, match="already has vram management"):
        enable_vram_management(wrapper.module, {Net: AutoWrappedModule}, DISK, disk_map=vramfx.DiskMap(path))


def test_each_wrapper_moves_between_its_states_and_computes_on_the_values_they_hold(saved):
    eager, path = saved
    model = enable_vram_management(empty(), BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path))
    head = model.head
    assert head.state == 0 and head.weight.is_meta
    head.onload()
    assert head.state == 1 and head.weight.dtype == torch.float32 and not head.weight.is_meta, "in memory"
    head.preparing()  # on the computation device in preparing_dtype: rounded to bfloat16, as the original does
    assert head.state == 2 and head._vramfx_unit.home[0].dtype == torch.bfloat16
    rounded = torch.nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        rounded.weight.copy_(eager.head.weight.bfloat16().float())
        rounded.bias.copy_(eager.head.bias.bfloat16().float())
        x = eager.blocks[2](eager.blocks[1](eager.blocks[0](eager.embed(X))))
        assert torch.equal(rounded(x), model(X))
        head.offload()
        assert head.state == 0 and torch.equal(eager(X), model(X))
        onload(model)
        assert {w.state for w in model.modules() if hasattr(w, "state")} == {1}
        assert torch.equal(eager(X), model(X))
        offload(model)
        assert all(p.is_meta for p in model.parameters())


def test_hot_loaded_adapters_are_added_after_the_linear_and_read_at_every_call(saved):
    eager, path = saved
    model = enable_vram_management(empty(), BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path))
    g = torch.Generator().manual_seed(2)
    a1, b1, a2, b2 = (torch.randn(shape, generator=g) for shape in ((4, WIDTH), (WIDTH, 4), (2, WIDTH), (WIDTH, 2)))
    layer = model.embed
    with torch.no_grad():
        base = eager.embed(X)
        layer.lora_A_weights += [a1, a2.double()]  # any dtype: cast to the input's
        layer.lora_B_weights += [b1, b2.double()]
        assert torch.equal(layer(X), base + X @ a1.T @ b1.T + X @ a2.T @ b2.T)

        class Merger(torch.nn.Module):
            def forward(self, out, outputs):
                return out + outputs.mean(dim=0)

        layer.lora_A_weights[1], layer.lora_B_weights[1] = a2, b2
        layer.lora_merger = Merger()
        assert torch.equal(layer(X), base + torch.stack([X @ a1.T @ b1.T, X @ a2.T @ b2.T]).mean(dim=0))
        layer.lora_merger = None
        layer.lora_A_weights.clear()
        layer.lora_B_weights.clear()
        assert torch.equal(layer(X), base)


def test_an_fp8_computation_dtype_runs_the_matmul_in_fp8(saved):
    eager, path = saved
    config = dict(DISK, onload_dtype=None, preparing_dtype=None, computation_dtype=torch.float8_e4m3fn)
    layer = AutoWrappedLinear(empty().head, name="head", disk_map=vramfx.DiskMap(path), **config)
    assert layer.enable_fp8
    x = X.bfloat16()
    with torch.no_grad():
        out = layer(x)
        fp8 = torch.float8_e4m3fn
        assert torch.equal(out, fp8_linear(x, eager.head.weight.to(fp8), eager.head.bias.to(fp8)))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), eager.head(x.float()), atol=0.25, rtol=0.1)  # fp8's precision


def test_quantize_names_the_dtype_weights_rest_in(saved):
    eager, path = saved
    model = enable_vram_management(empty(), BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path),
                                   quantize=torch.float8_e4m3fn)
    rounded = Net().eval()
    with torch.no_grad():
        for mine, theirs in zip(rounded.parameters(), eager.parameters()):
            mine.copy_(theirs.to(torch.float8_e4m3fn).float())
        for _ in range(2):
            assert torch.equal(rounded(X), model(X))
    numel = sum(p.numel() for p in eager.parameters())
    assert 0 < swap_stats(model).resident_bytes < 2 * numel, "kept in fp8: a byte per weight, not four"


class FakeQuantizeConfig:
    """What enable_vram_management reads of a quantization config: which layers it quantized."""

    method = "torchao_fp8_w8a16"

    def __init__(self, quantized: type):
        self.quantized = quantized

    def is_quantized_linear(self, module):
        return isinstance(module, self.quantized)


def test_a_quantization_with_kernels_of_its_own_is_refused_and_one_with_nothing_left_accepted(saved):
    eager, path = saved

    class QuantizedLinear(torch.nn.Linear):
        pass

    model = empty()
    model.head = QuantizedLinear(WIDTH, WIDTH, device="meta")
    with pytest.raises(ValueError, match=r"1 layer\(s\) of Net are quantized by torchao_fp8_w8a16's backend \(head\)"):
        enable_vram_management(model, BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path),
                               quantize=FakeQuantizeConfig(QuantizedLinear))
    assert "_vramfx_swap" not in model.__dict__
    dequantized = enable_vram_management(empty(), BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path),
                                         quantize=FakeQuantizeConfig(QuantizedLinear))
    with torch.no_grad():
        assert torch.equal(eager(X), dequantized(X))


@pytest.mark.parametrize(
    ("quantize", "config", "match"),
    [
        (torch.int8, {}, "quantize=torch.int8: pass one of"),
        (torch.float8_e4m3fn, dict(offload_dtype=torch.bfloat16), r"conflicts with vram_config\['offload_dtype'\]"),
        ("fp8", {}, "pass a storage dtype such as torch.float8_e4m3fn"),
    ],
)
def test_bad_quantize_arguments_are_refused(saved, quantize, config, match):
    _, path = saved
    with pytest.raises(ValueError, match=match):
        enable_vram_management(empty(), BLOCK_MAP, dict(DISK, **config), disk_map=vramfx.DiskMap(path),
                               quantize=quantize)


def test_wrappers_take_their_state_arguments_in_the_original_order(saved):
    eager, path = saved
    layer = AutoWrappedLinear(empty().head, "disk", "disk", None, None, None, None, torch.float32, "cpu", None,
                              "head", vramfx.DiskMap(path))
    with torch.no_grad():
        assert torch.equal(eager.head(X), layer(X, "ignored", as_the_original=True))


def test_load_state_dict_gives_a_wrapped_model_new_weights_and_refuses_weights_on_disk(saved):
    eager, path = saved
    in_memory = dict(offload_device="cpu", offload_dtype=torch.float32, computation_device="cpu")
    model = enable_vram_management(empty(), BLOCK_MAP, in_memory, vram_limit="4KiB", disk_map=vramfx.DiskMap(path))
    torch.manual_seed(5)
    other = Net().eval()
    new = other.state_dict()
    renamed = {key: new[key.replace(".module.", ".")] for key in model.state_dict()}  # wrappers add ".module"
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(eager(X), model(X))  # planned, some weights kept
        assert not model.load_state_dict(renamed).missing_keys
        for _ in range(2):
            assert torch.equal(other(X), model(X)), "the new weights, kept ones included"
    on_disk = enable_vram_management(empty(), BLOCK_MAP, DISK, disk_map=vramfx.DiskMap(path))
    with pytest.raises(RuntimeError, match="head.weight rests on disk .* cannot take new values"):
        on_disk.load_state_dict(renamed)
    with pytest.raises(RuntimeError, match=r"size mismatch for head.bias: .* shape \(3,\)"):
        model.load_state_dict({**renamed, "head.bias": torch.zeros(3)})
