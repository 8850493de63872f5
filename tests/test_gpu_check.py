"""benchmarks/gpu_check.py --smoke: every code path of the GPU check runs on CPU with tiny models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_smoke_run_checks_equality_and_budgets_and_writes_the_report(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    configs = {(r["model"], r["config"], r["storage"]) for r in rows}
    for model in ("llama", "dit"):
        assert (model, "all weights on the GPU", "-") in configs
        assert (model, "layer swap (synchronous)", "host") in configs
        assert (model, "one block ahead, side stream", "host") in configs
        assert (model, "vramfx", "host") in configs and (model, "vramfx", "disk") in configs
    vramfx_rows = [r for r in rows if r["config"] == "vramfx"]
    assert all(r["close"] and r["bit_exact"] for r in rows), "every path equals eager on CPU"
    assert all(r["budget_ok"] is not None and r["peak_growth_bytes"] is not None for r in vramfx_rows)
    assert all(r["vs_all_gpu"] and r["vs_swap"] and r["vs_prefetch"] and r["overlap"] for r in vramfx_rows)
    assert set(report["goal_figures"]) == {"host", "disk"}
    assert "xprefetch" in capsys.readouterr().out


def test_without_a_gpu_it_says_how_to_run(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
