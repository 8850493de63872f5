"""``vramfx inspect`` and ``vramfx plan --weights`` on quantized checkpoints: stored types and their
bytes, and plans that move the stored bytes."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch

from gguf_files import llama_gguf
from test_compile_quantized import tiny_llama
from vramfx.cli import main

WORKLOAD = '''
import torch, vramfx
from transformers import LlamaConfig, LlamaForCausalLM

def llama():
    with vramfx.skip_model_initialization():
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=False)).eval()
    return model, {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False}
'''


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    llama_gguf(tiny_llama(), folder / "llama-Q4_K.gguf", "Q4_K")
    (folder / "workload.py").write_text(WORKLOAD)
    return folder


def test_inspect_a_gguf_file_shows_its_quant_types_and_their_bytes(llama_file, capsys):
    from vramfx.storage.gguf import open_gguf_file

    path = str(llama_file / "llama-Q4_K.gguf")
    assert main(["inspect", path, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    with open_gguf_file(path) as f:
        by_type: dict[str, list[int]] = {}
        for t in f.tensors.values():
            by_type.setdefault(t.type_name, []).append(t.nbytes)
    assert data["format"] == "gguf" and data["architecture"] == "llama"
    assert data["dtypes"] == {k: {"count": len(v), "nbytes": sum(v)} for k, v in by_type.items()}
    assert set(by_type) == {"Q4_K", "F32"}
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "gguf (llama)" in out and re.search(r"stored types:\n(  .*\n)*  Q4_K\s+\d+ tensors", out)
    assert re.search(r"blk\.\d+\.ffn_\w+\.weight\s+[\d.]+ KiB\s+Q4_K\s+", out)


def test_inspect_a_scaled_fp8_file(tmp_path, capsys):
    w = torch.randn(8, 4)
    safetensors.torch.save_file({"fc.weight": w.to(torch.float8_e4m3fn), "fc.scale_weight": torch.ones(1),
                                 "fc.bias": torch.zeros(8)}, tmp_path / "m.safetensors")
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "scaled-fp8 safetensors"
    assert data["dtypes"]["float8_e4m3fn*scale"] == {"count": 1, "nbytes": 32}


def test_plan_with_a_gguf_file_plans_its_stored_bytes(llama_file, capsys):
    from vramfx.storage.gguf import GGUFMap

    plan = ["plan", f"{llama_file}/workload.py:llama", "--device", "cpu", "--weights",
            str(llama_file / "llama-Q4_K.gguf")]
    assert main([*plan, "--budget", "1"]) == 2
    minimum = int(re.search(r"budget_bytes >= (\d+)", capsys.readouterr().err).group(1))
    assert main([*plan, "--budget", str(minimum + 100_000), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    weights = {w["name"]: w for w in data["weights"]}
    with GGUFMap(llama_file / "llama-Q4_K.gguf") as source:
        for name, w in weights.items():
            if name in source:
                assert w["nbytes"] == source.info(name).nbytes
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert (down["format"], down["dtype"], down["compute_dtype"]) == ("Q4_K", "uint8", "float32")
    assert data["streamed_bytes"] > 0 and any(s["op"] == "cast" for s in data["steps"])
    assert main([*plan, "--budget", str(minimum + 100_000)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ decoded \(Q4_K \d+", out) and re.search(r"casts\s+\d+ per call \(Q4_K -> float32", out)
