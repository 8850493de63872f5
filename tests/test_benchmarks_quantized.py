"""The quantized-storage benchmark runs end to end (``--smoke``), so it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quantized_benchmark_smoke_runs_every_variant(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantized_cpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert {r["type"] for r in figures["decode"]} >= {"Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"}
    rows = {r["variant"]: r for r in figures["storage"]}
    assert set(rows) == {"eager bf16", "bf16 storage", "fp8 storage", "Q8_0 GGUF", "Q4_K GGUF"}
    assert rows["Q4_K GGUF"]["stored_bytes"] < rows["Q8_0 GGUF"]["stored_bytes"] < rows["bf16 storage"]["stored_bytes"]


def test_quantized_gpu_check_smoke_runs_on_cpu(tmp_path):
    pytest.importorskip("gguf")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantized_gpu_check.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "quantized_gpu_check.json").read_text())
    assert all(r["equal_to_cpu"] for r in figures["decode"]) and figures["model"]["bit_exact"]
