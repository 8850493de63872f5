"""The benchmark harness runs end to end (``--smoke``: tiny models, one call), so it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_harness_smoke_runs_every_contender(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = {r["contender"].split(" @")[0].split(" (")[0] for r in rows}
    assert {"eager", "vramfx compile", "vramfx swap", "accelerate cpu_offload", "accelerate disk_offload",
            "diffusers group offload block_level", "diffusers group offload leaf_level"} <= names
    failed = [r for r in rows if r["median_s"] is None]
    assert not failed, failed
    assert all(r["ratio"] > 0 for r in rows)
    assert "x eager" in done.stdout


def test_diffsynth_benchmark_smoke_runs_and_prints_weight_waits():
    from diffsynth_models import missing

    if missing():
        import pytest

        pytest.skip(f"DiffSynth-Studio is not installed ({', '.join(missing())} missing)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diffsynth_swap.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DiffSynth layers" in done.stdout and "waits" in done.stdout


def test_lora_benchmark_smoke_runs_and_checks_outputs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hot swap + next call" in done.stdout and "rank-8 LoRA" in done.stdout


def test_generate_benchmark_smoke_runs_every_runner(tmp_path):
    out = tmp_path / "generate.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VRAMFX_PROGRESS": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_cpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {"eager (dynamic cache)", "vramfx graphs", "vramfx module path", "accelerate disk_offload"} <= {
        r["runner"] for r in rows}
    assert "module path used: False" in done.stdout
