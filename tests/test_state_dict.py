"""load_state_dict: safetensors through DiskMap, weights-only pickles, wrappers, refusals."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from vramfx import WeightsError, load_state_dict
from vramfx.storage import state_dict as state_dict_mod


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g).half(),
        "ids": torch.arange(5),
    }


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


class _NotAWeight:
    """An arbitrary class: unpickling it would mean importing and running code."""


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_suffixes(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(_tensors(), path)
    _assert_same(load_state_dict(path), _tensors())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_one_key_wrappers_are_unwrapped(tmp_path, wrapper):
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: _tensors()}, path)
    _assert_same(load_state_dict(path), _tensors())


def test_both_pickle_formats_are_read_into_memory_never_mapped(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save(_tensors(), tmp_path / "zip.pt")
    torch.save(_tensors(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(tmp_path / "zip.pt"), _tensors())
    _assert_same(load_state_dict(tmp_path / "legacy.pt"), _tensors())
    # A mapped checkpoint changes with its file, and faults (SIGBUS) once the file is truncated.
    assert [(c["weights_only"], c.get("mmap", False)) for c in calls] == [(True, False), (True, False)]


def test_safetensors_file_and_folder(tmp_path):
    safetensors.torch.save_file(_tensors(), tmp_path / "model.safetensors")
    _assert_same(load_state_dict(tmp_path / "model.safetensors"), _tensors())
    _assert_same(load_state_dict(tmp_path), _tensors())
    _assert_same(load_state_dict([tmp_path / "model.safetensors"]), _tensors())


def test_dtype_casts_floating_only(tmp_path):
    torch.save(_tensors(), tmp_path / "w.bin")
    safetensors.torch.save_file(_tensors(), tmp_path / "w.safetensors")
    for path in (tmp_path / "w.bin", tmp_path / "w.safetensors"):
        state = load_state_dict(path, dtype=torch.bfloat16)
        assert state["w"].dtype == torch.bfloat16 and state["b"].dtype == torch.bfloat16
        assert state["ids"].dtype == torch.int64
        assert torch.equal(state["w"], _tensors()["w"].bfloat16())


def test_device_argument(tmp_path):
    torch.save(_tensors(), tmp_path / "w.pt")
    state = load_state_dict(tmp_path / "w.pt", device="meta")
    assert all(t.is_meta for t in state.values())


def test_sharded_pickle_index_and_its_folder(tmp_path):
    tensors = _tensors()
    torch.save({"w": tensors["w"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": tensors["b"], "ids": tensors["ids"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        "w": "pytorch_model-00001-of-00002.bin",
        "b": "pytorch_model-00002-of-00002.bin",
        "ids": "pytorch_model-00002-of-00002.bin",
    }
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(load_state_dict(index), tensors)
    _assert_same(load_state_dict(tmp_path), tensors)


def test_folder_with_one_pickle(tmp_path):
    torch.save(_tensors(), tmp_path / "pytorch_model.bin")
    _assert_same(load_state_dict(tmp_path), _tensors())


def test_folder_with_nothing_loadable(tmp_path):
    (tmp_path / "README").write_text("hi")
    with pytest.raises(WeightsError, match="holds no safetensors; expected exactly one pickle checkpoint"):
        load_state_dict(tmp_path)


def test_pickle_that_is_not_weights_only_is_refused_with_conversion_advice(tmp_path):
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": _tensors(), "hparams": _NotAWeight()}, path)
    with pytest.raises(WeightsError, match=r"full\.ckpt is not a weights-only pickle") as info:
        load_state_dict(path)
    message = str(info.value)
    assert "GLOBAL" in message and "_NotAWeight" in message  # what torch refused
    assert "safetensors" in message and "save_file" in message and "weights_only=False" in message


def test_pickle_that_is_not_a_flat_mapping_is_refused(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": _tensors(), "epoch": 3}, path)
    with pytest.raises(WeightsError, match=r"not a flat mapping of names to tensors \(entries 'state_dict', 'epoch'"):
        load_state_dict(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(WeightsError, match="holds a list"):
        load_state_dict(path)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match=r"broken\.bin"):
        load_state_dict(path)


def test_missing_pickle(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(ValueError, match="dtype="):
        load_state_dict(tmp_path, dtype="fp16")


def test_docstring_says_only_safetensors_stream():
    assert "Only safetensors can be streamed" in state_dict_mod.load_state_dict.__doc__
