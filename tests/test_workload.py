"""Targets: finding a workload function in a file or module, and checking what it returns."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from vramfx.workload import TargetError, Workload, as_workload, load_workload

WORKLOAD = textwrap.dedent(
    """
    import torch
    from helper import width  # a neighbour of this file: its folder is on sys.path

    def build():
        return torch.nn.Linear(width, 3), (torch.randn(1, width),)

    def with_kwargs():
        return torch.nn.Linear(width, 3), [], {"input": torch.randn(2, width, device="meta")}

    def kwargs_only():
        return torch.nn.Linear(width, 3), {"input": torch.randn(2, width)}

    def one_tensor():
        return torch.nn.Linear(width, 3), torch.randn(2, width)

    def model_only():
        return torch.nn.Linear(width, 3)

    def broken():
        raise RuntimeError("no config\\nhere")

    def not_a_model():
        return 42

    def bad_args():
        return torch.nn.Linear(width, 3), 5

    class Factory:
        @staticmethod
        def build():
            return torch.nn.Linear(width, 3)

    model = torch.nn.Linear(2, 3)
    number = 7
    """
)


@pytest.fixture
def workload_file(tmp_path):
    (tmp_path / "helper.py").write_text("width = 4\n")
    path = tmp_path / "workload.py"
    path.write_text(WORKLOAD)
    yield path
    # The modules these tests import must not leak into later tests.
    for name in [n for n in sys.modules if n in ("helper", "workload") or n.startswith("_vramfx_workload_")]:
        del sys.modules[name]


def test_file_target_returns_model_args_kwargs(workload_file):
    w = load_workload(f"{workload_file}:build")
    assert isinstance(w.model, torch.nn.Linear) and w.model.in_features == 4
    assert len(w.args) == 1 and w.args[0].shape == (1, 4) and w.kwargs == {}

    w = load_workload(f"{workload_file}:with_kwargs")
    assert w.args == () and w.kwargs["input"].device.type == "meta"
    assert load_workload(f"{workload_file}:kwargs_only").kwargs["input"].shape == (2, 4)
    assert load_workload(f"{workload_file}:one_tensor").args[0].shape == (2, 4)
    assert load_workload(f"{workload_file}:model_only").args == ()
    assert isinstance(load_workload(f"{workload_file}:Factory.build").model, torch.nn.Linear)


def test_module_target(workload_file, monkeypatch):
    monkeypatch.syspath_prepend(str(workload_file.parent))
    w = load_workload("workload:build")
    assert isinstance(w.model, torch.nn.Linear)


@pytest.mark.parametrize(
    "target, match",
    [
        ("no_colon_here", r"must be path/to/file.py:function or package.module:function"),
        ("workload.py:", r"must be path/to/file.py:function"),
        ("{dir}/missing.py:build", r"missing.py: no such file"),
        ("surely_not_a_module_xyz:build", r"no module named 'surely_not_a_module_xyz'"),
        ("{file}:nope", r"has no attribute 'nope'"),
        ("{file}:number", r"is an object of type int, not a function"),
        ("{file}:model", r"is an object of type Linear, not a function"),
        ("{file}:broken", r"raised RuntimeError: no config here"),
        ("{file}:not_a_model", r"returned int; it must return model, \(model, args\) or \(model, args, kwargs\)"),
        ("{file}:bad_args", r"returned args of type int; args must be a tuple"),
    ],
)
def test_bad_targets_say_what_is_wrong(workload_file, target, match):
    target = target.format(file=workload_file, dir=workload_file.parent)
    with pytest.raises(TargetError, match=match):
        load_workload(target)


def test_a_file_that_fails_to_import_names_the_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import surely_not_a_module_xyz\n")
    with pytest.raises(TargetError, match=r"importing .*bad.py failed: ModuleNotFoundError"):
        load_workload(f"{path}:build")


def test_a_workload_that_exits_is_an_error_not_an_exit(tmp_path):
    """A script that parses its own argv on import, or a function that calls sys.exit, must not
    end the CLI with the script's exit code (2 is the CLI's "budget below minimum")."""
    on_import = tmp_path / "argv_script.py"
    on_import.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(TargetError, match=r"importing .*argv_script.py failed: SystemExit"):
        load_workload(f"{on_import}:build")
    in_call = tmp_path / "exits.py"
    in_call.write_text("import sys\n\ndef build():\n    sys.exit(2)\n")
    with pytest.raises(TargetError, match=r"exits.py:build raised SystemExit"):
        load_workload(f"{in_call}:build")


def test_as_workload_accepts_the_documented_forms_only():
    model = torch.nn.Linear(1, 1)
    assert as_workload(model) == Workload(model)
    assert as_workload((model, (1,), {"a": 2})) == Workload(model, (1,), {"a": 2})
    for bad in (None, (model,), (model, (), {}, 4), ("model", ())):
        with pytest.raises(TargetError, match="it must return"):
            as_workload(bad)
    with pytest.raises(TargetError, match="kwargs must be a dict"):
        as_workload((model, (), [1]))
