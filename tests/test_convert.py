"""convert: safetensors checkpoints rewritten in a storage dtype, streamed; ConvertedSource."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vramfx
from vramfx.measure import PeakMemory
from vramfx import conversion as convert_module
from vramfx.storage.converted import ConvertedSource
from vramfx.storage.host import HostSource

FP8 = torch.float8_e4m3fn


def checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.proj.weight": torch.randn(16, 8, generator=g),
        "blocks.0.proj.bias": torch.randn(16, generator=g),
        "blocks.0.norm.weight": torch.randn(16, generator=g),
        "embed_tokens.weight": torch.randn(32, 8, generator=g),
        "table.weight": torch.randn(32, 8, generator=g),
        "position_ids": torch.arange(8),
        "already.weight": torch.randn(4, 4, generator=g).to(FP8),
    }


def test_a_file_converts_weights_and_leaves_the_keep_list_and_integers(tmp_path):
    tensors = checkpoint()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    out = vramfx.convert(tmp_path / "model.safetensors", tmp_path / "fp8.safetensors", dtype=FP8)
    converted = load_file(out)  # the safetensors library reads it back
    assert converted.keys() == tensors.keys()
    assert converted["blocks.0.proj.weight"].dtype == FP8
    assert torch.equal(converted["blocks.0.proj.weight"].float(), tensors["blocks.0.proj.weight"].to(FP8).float())
    assert torch.equal(converted["already.weight"].view(torch.uint8), tensors["already.weight"].view(torch.uint8))
    assert converted["table.weight"].dtype == FP8  # without the model, only names and shapes are known
    for name in ("blocks.0.proj.bias", "blocks.0.norm.weight", "embed_tokens.weight", "position_ids"):
        assert torch.equal(converted[name], tensors[name]), name
    assert vramfx.DiskMap(out).info("blocks.0.proj.weight").nbytes == 16 * 8


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].proj = torch.nn.Linear(8, 16)
        self.blocks[0].norm = torch.nn.LayerNorm(16)
        self.embed_tokens = torch.nn.Embedding(32, 8)
        self.table = torch.nn.Embedding(32, 8)
        self.register_buffer("position_ids", torch.arange(8))


def test_with_the_model_class_rules_apply_as_compile_applies_them(tmp_path):
    save_file(checkpoint(), tmp_path / "model.safetensors")
    with vramfx.skip_model_initialization():
        model = Model()
    out = vramfx.convert(tmp_path / "model.safetensors", tmp_path / "fp8.safetensors", dtype=FP8, model=model)
    converted = vramfx.DiskMap(out)
    assert converted.info("table.weight").dtype == torch.float32  # an nn.Embedding
    assert converted.info("blocks.0.proj.weight").dtype == FP8


def test_a_sharded_checkpoint_becomes_a_folder_with_its_index(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = checkpoint()
    names = sorted(tensors)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, src / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = vramfx.convert(src, tmp_path / "dst", dtype=torch.bfloat16, keep_in_compute_dtype=None)
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors", "model.safetensors.index.json"]
    written = json.loads((out / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"]
    dm = vramfx.DiskMap(out)
    assert written["metadata"]["total_size"] == dm.nbytes
    assert dm.info("blocks.0.proj.bias").dtype == torch.bfloat16  # nothing kept
    assert dm.info("already.weight").dtype == FP8  # fp8 converts exactly into bf16: left as it is
    assert torch.equal(dm["table.weight"], tensors["table.weight"].to(torch.bfloat16))


def test_memory_stays_at_about_one_tensor_whatever_the_checkpoint(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(16)}  # 16 x 4 MiB
    save_file(tensors, tmp_path / "big.safetensors")
    del tensors
    with PeakMemory("cpu") as peak:
        vramfx.convert(tmp_path / "big.safetensors", tmp_path / "fp8.safetensors", dtype=FP8)
    # One tensor read (4 MiB) and converted (1 MiB) at a time, plus allocator slack; all at
    # once would be 80 MiB.
    assert peak.growth_bytes < 40 * 2**20, peak.growth_bytes


def test_bad_arguments_and_failures_leave_nothing_behind(tmp_path, monkeypatch):
    save_file(checkpoint(), tmp_path / "model.safetensors")
    src = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="dtype must be one of"):
        vramfx.convert(src, tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match="dst .* exists"):
        vramfx.convert(src, src, dtype=FP8)

    def broken(self, dtype):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(torch.Tensor, "to", broken)
    with pytest.raises(RuntimeError, match="injected"):
        vramfx.convert(src, tmp_path / "x.safetensors", dtype=FP8)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    with pytest.raises(ValueError, match="folder .*missing does not exist"):
        vramfx.convert([src], tmp_path / "missing" / "out", dtype=FP8)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    converted = []
    monkeypatch.setattr(convert_module, "_convert_file", lambda *args: converted.append(args))
    with pytest.raises(vramfx.WeightsError):
        vramfx.convert([src, tmp_path / "bad.safetensors"], tmp_path / "out", dtype=FP8)
    assert not converted, "a bad file is found before any file is converted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "model.safetensors"]


def test_converted_source_converts_each_weight_once():
    reads = []

    class Counting(HostSource):
        def read_into(self, key, out):
            reads.append(key)
            super().read_into(key, out)

    w = torch.randn(4, 4)
    source = ConvertedSource(Counting({"w": w}), {"w": torch.bfloat16})
    assert source.info("w").dtype == torch.bfloat16 and source.info("w").nbytes == 32
    for _ in range(3):
        out = torch.empty(32, dtype=torch.uint8)
        source.read_into("w", out)
        assert torch.equal(out.view(torch.bfloat16).view(4, 4), w.to(torch.bfloat16))
    assert reads == ["w"]


def test_a_model_that_is_no_module_is_refused_by_name(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="model must be the torch.nn.Module the checkpoint is for"):
        vramfx.convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", dtype=torch.float8_e4m3fn, model=3)
