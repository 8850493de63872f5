"""``vramfx plan`` and ``vramfx inspect`` run as a user runs them: a subprocess on a workload file.

The models are real architectures from tests/tiny_models.py, built on meta in a workload file
written to a temporary folder. A fresh interpreter spends seconds importing torch, so each format
and each exit status is run as a subprocess once, on one of the two models; the other checks
call the same ``main`` in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, build_saved

from vramfx.cli import main
from vramfx.storage.diskmap import DiskMap
from vramfx.plan.plan import Plan

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = textwrap.dedent(
    """
    import torch
    from tiny_models import ARCHS, build_empty

    def wan():
        arch = ARCHS["wan"]
        return build_empty(arch), (), arch.inputs()  # real inputs; the model is meta

    def llama():
        arch = ARCHS["llama"]
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in arch.inputs().items()}
        return build_empty(arch), (), inputs  # meta inputs
    """
)

ERRORS = textwrap.dedent(
    """
    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("config missing")
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "workload.py").write_text(WORKLOAD)
    (path / "errors.py").write_text(ERRORS)
    return path


@pytest.fixture(scope="module")
def llama_weights(folder) -> Path:
    """The llama of the workload, saved as a sharded checkpoint (an index and several shards)."""
    torch.manual_seed(0)
    model = ARCHS["llama"].build().eval()
    model.save_pretrained(folder / "llama", max_shard_size="200KB")
    return folder / "llama"


class Runs:
    """Command-line runs in fresh interpreters, started together and read when a test needs one.

    Each run spends seconds importing torch on one core; started together, they share the
    machine's cores. Output goes to files (never a full pipe) and is not a terminal, so no
    progress is drawn.
    """

    def __init__(self, folder: Path):
        self._folder = folder
        self._started: dict[str, tuple[subprocess.Popen, Path, Path, list[str]]] = {}
        self._results: dict[str, subprocess.CompletedProcess] = {}

    def start(self, key: str, *args: str, module: str = "vramfx.cli") -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        out, err = self._folder / f"{key}.out", self._folder / f"{key}.err"
        command = [sys.executable, "-m", module, *args]
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        self._started[key] = (process, out, err, command)

    def result(self, key: str) -> subprocess.CompletedProcess:
        if key not in self._results:
            process, out, err, command = self._started[key]
            process.wait(timeout=600)
            self._results[key] = subprocess.CompletedProcess(
                command, process.returncode, out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8"))
        return self._results[key]

    def stop(self) -> None:
        for process, *_ in self._started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def one_line_error(result: subprocess.CompletedProcess, code: int, match: str) -> None:
    """The run failed with ``code`` and exactly one line on stderr matching ``match``, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramfx "), result.stderr
    assert re.search(match, lines[0]), lines[0]
    assert result.stdout == ""


def minimum_from(result: subprocess.CompletedProcess) -> int:
    """The exact minimum a budget error states."""
    one_line_error(result, 2, r"below the minimum of [\d.]+ [KMG]iB")
    return int(re.search(r"budget_bytes >= (\d+)", result.stderr).group(1))


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """Every subprocess run of this module: first those that need nothing, then those that need
    the minimum budgets the first ones state."""
    runs = Runs(tmp_path_factory.mktemp("runs"))
    wan, llama = f"{folder}/workload.py:wan", f"{folder}/workload.py:llama"
    try:
        runs.start("wan minimum", "plan", wan, "--budget", "1MB", "--device", "cuda")
        runs.start("llama minimum", "plan", llama, "--budget", "1000", "--device", "cpu")
        runs.start("not a model", "plan", f"{folder}/errors.py:not_a_model", "--budget", "8GB")
        runs.wan_minimum = minimum_from(runs.result("wan minimum"))
        runs.llama_minimum = minimum_from(runs.result("llama minimum"))
        wan_budget = str(runs.wan_minimum + 16 * 2**10)
        runs.start("wan table", "plan", wan, "--budget", wan_budget, "--device", "cuda")
        runs.start("wan chrome", "plan", wan, "--budget", wan_budget, "--device", "cuda", "--format", "chrome",
                   "-o", str(folder / "wan.trace.json"), module="vramfx")
        runs.start("llama json", "plan", llama, "--budget", str(runs.llama_minimum), "--device", "cpu",
                   "--format", "json", "--calls", "3", "--link-bandwidth", "2GB/s", "--compute-throughput", "80GFLOPS")
        if importlib.util.find_spec("matplotlib") is not None:  # the optional ``plot`` extra
            runs.start("llama png", "plan", llama, "--budget", str(runs.llama_minimum + 100_000), "--device", "cpu",
                       "--format", "png", "-o", str(folder / "memory.png"))
        yield runs
    finally:
        runs.stop()


@pytest.fixture(scope="module")
def wan_minimum(runs) -> int:
    return runs.wan_minimum


@pytest.fixture(scope="module")
def llama_minimum(runs) -> int:
    return runs.llama_minimum


def test_budget_below_the_minimum_exits_2_stating_it(wan_minimum, llama_minimum):
    # CUDA plans keep a 64 MiB margin, CPU plans 8 MiB; the fixture checked the one-line errors.
    assert wan_minimum > 64 * 2**20 > llama_minimum > 8 * 2**20


def test_table_on_wan_for_cuda_without_cuda(runs):
    result = runs.result("wan table")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # piped: no progress
    out = result.stdout
    for text in ("planned peak", "resident", "streamed", "activations", "predicted", "stall", "largest transfers",
                 "link     20 GB/s (default for cuda, weights in host memory", "compute  100 TFLOPS (default for cuda",
                 "calls    10 (default)",
                 "alignment 256 B"):
        assert text in out, text
    rows = [line.split()[0] for line in out.split("schedule, one line per layer")[1].splitlines()[2:]]
    layers = [r for r in rows if not r.startswith(("-", "total", "and"))]
    assert "blocks.0" in layers and "blocks.1" in layers and "patch_embedding" in layers
    assert len(layers) == len(set(layers)) < 12, "one line per layer, not per node"


def test_json_at_the_stated_minimum_on_llama(runs):
    result = runs.result("llama json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    _check_plan_json(data, runs.llama_minimum)
    assert data["calls"] == 3 and data["alignment"] == 64
    assert data["cost_model"]["link_bytes_per_s"] == 2e9 and data["cost_model"]["compute_flops_per_s"] == 80e9


def _check_plan_json(data: dict, budget: int) -> None:
    for key in ("budget_bytes", "peak_bytes", "resident_bytes", "streamed_bytes", "weight_bytes",
                "activation_peak_bytes", "steps", "predicted", "transfers", "weights"):
        assert key in data, key
    assert data["budget_bytes"] == budget and 0 < data["peak_bytes"] <= budget
    assert data["weight_bytes"] == sum(w["nbytes"] for w in data["weights"])
    assert data["streamed_bytes"] == sum(sum(t["sizes"]) for t in data["transfers"]) > 0
    assert data["peak_bytes"] == (data["resident_bytes"] + data["arena_bytes"] + data["activation_peak_bytes"]
                                  + data["workspace_bytes"] + data["upcast_bytes"])
    ops = {s["op"] for s in data["steps"]}
    assert {"fetch", "wait", "drop"} | ({"cast"} if data["casts"] else set()) == ops
    for step in data["steps"]:
        assert step["names"] and step["nbytes"] > 0 and 0 <= step["position"] <= data["num_positions"]
    positions = [s["position"] for s in data["steps"]]
    assert positions == sorted(positions)
    assert data["predicted"]["seconds_per_call"] > 0 and data["predicted"]["stall_seconds"] >= 0
    assert json.loads(Plan.from_json(json.dumps(data)).to_json()) == data


def test_chrome_trace_on_wan(runs, folder):
    path = folder / "wan.trace.json"
    result = runs.result("wan chrome")
    assert result.returncode == 0, result.stderr
    assert f"wrote chrome to {path}" in result.stdout
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    threads = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert threads == {"compute", "copy engine"}
    categories = {e["cat"] for e in events if e["ph"] == "X"}
    assert {"layer", "node", "copy"} <= categories
    assert {e["name"] for e in events if e["ph"] == "C"} == {"device memory (MiB)", "budget (MiB)"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
    assert "blocks.1" in {e["name"] for e in events if e.get("cat") == "layer"}


def test_png_on_llama(runs, folder):
    pytest.importorskip("matplotlib")
    png = folder / "memory.png"
    result = runs.result("llama png")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and f"wrote png to {png}" in result.stdout
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000


def test_a_function_that_returns_no_model_is_a_one_line_error(runs):
    one_line_error(runs.result("not a model"), 1, r"errors.py:not_a_model returned int; it must return model, \(model, args\)")


def test_inspect_reads_the_headers_of_a_sharded_checkpoint(llama_weights, capsys, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setattr(DiskMap, "read_into", _no_data)
    assert main(["inspect", str(llama_weights), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = {}
    for shard in sorted(llama_weights.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                expected[key] = f.get_slice(key).get_shape()
    assert data["count"] == len(expected)
    assert data["index"].endswith(".index.json") and len(data["shards"]) == len(list(llama_weights.glob("*.safetensors"))) > 1
    assert data["nbytes"] == sum(4 * torch.Size(s).numel() for s in expected.values())
    assert data["dtypes"] == {"float32": {"count": len(expected), "nbytes": data["nbytes"]}}
    largest = data["largest"][0]
    assert largest["nbytes"] == max(4 * torch.Size(s).numel() for s in expected.values())
    assert largest["shape"] == list(expected[largest["name"]])


# In-process: the same main(), where a fresh interpreter would only add seconds of imports.


@pytest.mark.parametrize(
    "args, match",
    [
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--device", "tpu"], r"--device 'tpu': expected cpu or cuda"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--link-bandwidth", "fast"], r"'fast' is not a positive rate"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--compute-throughput", "100TB/s"], r"not a positive rate"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--link-bandwidth", "inf"], r"'inf' is not a positive rate"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--compute-throughput", "1e500TFLOPS"],
         r"not a positive rate"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--calls", "0"], r"--calls must be >= 1"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--format", "png"], r"--format png needs -o FILE.png"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "-o", "{folder}/nope/out.json"], r"folder .*nope does not exist"),
        (["plan", "{folder}/workload.py:wan", "--budget", "90%", "--device", "cuda"], r"CUDA is not available here; give bytes"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--device", "cuda", "--calibrate"],
         r"--calibrate measures the device, and CUDA is not available here"),
        (["plan", "surely_not_a_module_xyz:build", "--budget", "8GB"], r"no module named 'surely_not_a_module_xyz'"),
        (["plan", "{folder}/errors.py:broken", "--budget", "8GB"], r"errors.py:broken raised RuntimeError: config missing"),
        (["plan", "{folder}/errors.py", "--budget", "8GB"], r"must be path/to/file.py:function"),
        (["plan", "{folder}/missing.py:wan", "--budget", "8GB"], r"missing.py: no such file"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8Gb"], r"--budget: .*lower-case 'b' means bits"),
        (["plan", "{folder}/workload.py:wan", "--budget", "eight"], r"--budget: budget='eight' is not understood"),
        (["plan", "{folder}/workload.py:wan", "--budget", "8GB", "--weights", "{folder}/missing/"],
         r"--weights .*missing/: no such file or directory"),
        (["inspect", "{folder}/missing.safetensors"], r"missing.safetensors: no such file or directory"),
    ],
)
def test_errors_in_process(folder, capsys, args, match):
    if "CUDA is not available" in match and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main([a.format(folder=folder) for a in args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_usage_errors_are_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "workload.py:wan"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "required: --budget" in err


def test_png_without_matplotlib_says_how_to_install_it(folder, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["plan", f"{folder}/workload.py:wan", "--budget", "8GB", "--format", "png", "-o", str(tmp_path / "m.png")])
    assert code == 1
    assert "pip install 'vramfx[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_debug_shows_the_traceback(folder, capsys):
    assert main(["plan", f"{folder}/errors.py:broken", "--budget", "8GB", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: config missing" in err
    assert err.strip().splitlines()[-1].startswith("vramfx plan: error:")


def _no_data(*args, **kwargs):
    raise AssertionError("tensor data was read; only headers may be")


def test_table_with_weights_on_llama_in_process(folder, llama_weights, capsys, monkeypatch):
    monkeypatch.setattr(DiskMap, "read_into", _no_data)
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "100MB", "--device", "cuda",
                 "--weights", str(llama_weights)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"weights\s+.*llama: all \d+ graph weights match in name, shape and dtype", out)
    assert "link     5 GB/s (default for cuda, weights on disk" in out  # as compile plans a DiskMap
    assert "layers.0" in out and "embed_tokens" in out


def test_json_on_wan_for_cuda_in_process(folder, wan_minimum, capsys):
    budget = wan_minimum + 16 * 2**10
    assert main(["plan", f"{folder}/workload.py:wan", "--budget", str(budget), "--device", "cuda",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    _check_plan_json(data, budget)
    assert data["alignment"] == 256
    assert data["cost_model"]["link_bytes_per_s"] == 20e9


def test_weights_that_do_not_match_the_model(folder, capsys, tmp_path):
    build_saved(ARCHS["bert"], tmp_path / "bert")
    capsys.readouterr()  # saving draws progress bars
    code = main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--device", "cpu",
                 "--weights", str(tmp_path / "bert")])
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(r"error: \d+ meta parameter\(s\) have no weight \(not found in the weights\): embed_tokens.weight", err)


def test_inspect_table(llama_weights, capsys):
    assert main(["inspect", str(llama_weights), "--largest", "3"]) == 0
    out = capsys.readouterr().out
    assert "tensors" in out and "shards (" in out and "float32" in out and "largest tensors:" in out
    assert "layers.0" in out and "embed_tokens" in out
    largest = out.split("largest tensors:")[1].strip().splitlines()
    assert len(largest) == 3


def test_storage_and_compute_dtypes_plan_and_show_the_casts(folder, llama_weights, capsys, monkeypatch):
    monkeypatch.setattr(DiskMap, "read_into", _no_data)
    precision = ["--storage-dtype", "float8_e4m3fn", "--compute-dtype", "bfloat16"]
    plan = ["plan", f"{folder}/workload.py:llama", "--device", "cpu", "--weights", str(llama_weights), *precision]
    assert main([*plan, "--budget", "1"]) == 2
    minimum = int(re.search(r"budget_bytes >= (\d+)", capsys.readouterr().err).group(1))
    assert main([*plan, "--budget", str(minimum), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    _check_plan_json(data, minimum)
    weights = {w["name"]: w for w in data["weights"]}
    assert weights["layers.0.mlp.up_proj.weight"]["dtype"] == "float8_e4m3fn"
    assert weights["layers.0.mlp.up_proj.weight"]["compute_dtype"] == "bfloat16"
    assert weights["norm.weight"]["dtype"] == "bfloat16" and weights["norm.weight"]["compute_dtype"] is None
    casts = [s for s in data["steps"] if s["op"] == "cast"]
    assert casts and data["upcast_bytes"] > 0 and len(casts) == len(data["casts"])
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "100MB", "--device", "cpu", *precision,
                 "--keep", "minimal"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"precision\s+weights stored in float8_e4m3fn, computed in bfloat16, keep minimal", out)
    assert re.search(r"casts\s+\d+ per call \(float8_e4m3fn -> bfloat16\)", out)
    assert re.search(r"\bdrop\s+cast\n", out), "the schedule has a cast column"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--storage-dtype", "fp9"], r"--storage-dtype 'fp9': not a torch dtype"),
        (["--storage-dtype", "int8"], r"storage_dtype must be one of .* \(--storage-dtype, --compute-dtype, --keep\)"),
    ],
)
def test_bad_precision_options_are_one_line_errors(folder, capsys, extra, match):
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "100MB", *extra]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_key_map_renames_stored_keys(folder, llama_weights, capsys, tmp_path):
    import safetensors.torch

    with DiskMap(llama_weights) as weights:
        tensors = {k: weights[k] for k in weights}
    path = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file({"net." + k.replace("layers.", "blocks."): v for k, v in tensors.items()}, path)
    prefixes = ["--key-map", "net.blocks.=layers.", "--key-map", "net.="]
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--device", "cpu",
                 "--weights", str(path), *prefixes]) == 0
    assert re.search(r"all \d+ graph weights match", capsys.readouterr().out)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"net." + k.replace("layers.", "blocks."): k for k in tensors}))
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--device", "cpu",
                 "--weights", str(path), "--key-map", str(mapping)]) == 0
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--key-map", "x"]) == 1
    assert "--key-map and --variant apply to --weights" in capsys.readouterr().err


def test_variant_reads_the_variants_files(folder, capsys, tmp_path):
    torch.manual_seed(0)
    model = ARCHS["llama"].build()
    model.save_pretrained(tmp_path)
    model.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    capsys.readouterr()
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--device", "cpu",
                 "--weights", str(tmp_path), "--variant", "fp16", "--storage-dtype", "float16"]) == 0
    assert re.search(r"all \d+ graph weights match", capsys.readouterr().out)
    assert main(["plan", f"{folder}/workload.py:llama", "--budget", "1GB", "--device", "cpu",
                 "--weights", str(tmp_path), "--variant", "bf16"]) == 1
    assert "holds no weights in variant 'bf16'" in capsys.readouterr().err


def test_plan_reads_the_capture_cache_unless_told_not_to(folder, capsys, capture_cache_dir):
    argv = ["plan", f"{folder}/workload.py:wan", "--budget", "8GB", "--device", "cpu", "--format", "json"]
    assert main(argv + ["--no-cache"]) == 0
    uncached = capsys.readouterr().out
    assert not (capture_cache_dir / "captures").exists()
    assert main(argv) == 0
    assert len(list((capture_cache_dir / "captures").glob("*.pkl"))) == 1
    capsys.readouterr()
    assert main(argv) == 0  # read back from the cache: the same plan
    assert capsys.readouterr().out == uncached


def test_cpu_plan_with_weights_uses_them_in_place_as_compile_does(folder, llama_weights, capsys, tmp_path):
    import vramfx
    from tiny_models import build_empty

    aligned = vramfx.convert(llama_weights, tmp_path / "aligned", dtype=None)
    command = ["plan", f"{folder}/workload.py:llama", "--budget", "24MiB", "--device", "cpu", "--weights", str(aligned)]
    assert main([*command, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    arch = ARCHS["llama"]
    with vramfx.DiskMap(aligned) as weights:
        plan = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu",
                              example_kwargs=arch.inputs()).plan
    assert data["in_place"] and data["in_place"] == list(plan.in_place)
    assert data["in_place_bytes"] == plan.in_place_bytes and data["reads"] == plan.reads == "copy"
    assert data["resident"] == list(plan.resident) and data["streamed_bytes"] == plan.streamed_bytes
    assert data["predicted"]["seconds_per_call"] == pytest.approx(plan.predicted.seconds_per_call)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert re.search(rf"reads\s+{len(plan.in_place)} weights used in place .* the others copied through the page cache", out)
    assert re.search(r"in place\s+.* in \d+ weights \(mapped file pages, outside the budget\)", out)
    assert main([*command, "--no-in-place", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["in_place"] == []
    assert main([*command, "--bypass-page-cache", "--format", "json"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["in_place"] == [] and forced["reads"] == "direct"


def test_calibrate_plans_with_this_machines_rates_and_timed_nodes(folder, llama_weights, capsys, tmp_path,
                                                                   monkeypatch):
    """--calibrate gives the plan compile makes with ``CostModel.calibrate(device, time_nodes=True)``:
    measured rates, each node timed, the link read from the weights' page cache."""
    import vramfx
    from vramfx.plan import timing

    monkeypatch.setattr(timing, "_WINDOW_S", 0.6)  # what is timed matters here, not how typical it is

    aligned = vramfx.convert(llama_weights, tmp_path / "aligned", dtype=None)
    command = ["plan", f"{folder}/workload.py:llama", "--budget", "24MiB", "--device", "cpu", "--weights", str(aligned),
               "--no-cache"]
    assert main([*command, "--format", "json"]) == 0
    fixed = json.loads(capsys.readouterr().out)["cost_model"]
    assert main([*command, "--calibrate", "--format", "json"]) == 0
    calibrated = json.loads(capsys.readouterr().out)["cost_model"]
    assert calibrated["time_nodes"] is True and calibrated["rates"] and "time_nodes" not in fixed
    assert calibrated["link_bytes_per_s"] != fixed["link_bytes_per_s"]  # measured, not the default
    assert main([*command, "--calibrate", "--link-bandwidth", "3GB/s"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"link\s+3 GB/s \(--link-bandwidth\), a copy beside the kernels .* \(calibrated here\)", out)
    assert re.search(r"compute\s+.* \(calibrated here\); each node timed at its own shapes on cpu", out)
