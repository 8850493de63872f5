"""Weights held the DiffSynth-Studio way: its DiskMap's call style, its DiskMap objects, its load calls."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import vramfx
from vramfx.storage.foreign import DiskMap, converter_key_map, source_of
from vramfx.swap import AutoWrappedLinear, enable_vram_management, load_state_dict

WIDTH = 8
X = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(WIDTH, WIDTH)
        self.second = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def checkpoint_names(state_dict):
    """A converter as the original's: checkpoint names -> the model's (``proj_in`` -> ``first``)."""
    renames = {"proj_in": "first", "proj_out": "second"}
    return {f"{renames[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state_dict.items() if "." in k}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    eager = Net().eval()
    folder = tmp_path_factory.mktemp("net")
    stored = {k.replace("first", "proj_in").replace("second", "proj_out"): v for k, v in eager.state_dict().items()}
    stored["unused"] = torch.zeros(1)
    save_file(stored, folder / "model.safetensors")
    torch.save(stored, folder / "model.pt")
    return eager, folder


def empty() -> Net:
    with vramfx.skip_model_initialization():
        return Net().eval()


def test_the_converter_renames_keys_and_leaves_the_others_out(saved):
    eager, folder = saved
    dm = DiskMap(str(folder / "model.safetensors"), "cpu", state_dict_converter=checkpoint_names)
    assert sorted(dm) == ["first.bias", "first.weight", "second.bias", "second.weight"]
    assert torch.equal(dm["first.weight"], eager.first.weight)
    again = pickle.loads(pickle.dumps(dm))
    assert type(again) is DiskMap and sorted(again) == sorted(dm)


def test_both_paths_read_a_diskmap_made_the_original_way(saved):
    eager, folder = saved
    dm = DiskMap(str(folder / "model.safetensors"), "cpu", state_dict_converter=checkpoint_names)
    swapped = enable_vram_management(empty(), {torch.nn.Linear: AutoWrappedLinear},
                                     dict(offload_device="disk", computation_device="cpu"), vram_limit=0, disk_map=dm)
    compiled = vramfx.compile(empty(), "64MB", weights=dm, device="cpu")
    with torch.no_grad():
        assert torch.equal(eager(X), swapped(X))
        assert torch.equal(eager(X), compiled(X))


def test_torch_dtype_rounds_what_the_runtime_reads_as_the_original_rounds_what_it_reads(saved):
    eager, folder = saved
    dm = DiskMap(str(folder / "model.safetensors"), "cpu", torch.float16, checkpoint_names)
    model = enable_vram_management(empty(), {torch.nn.Linear: AutoWrappedLinear},
                                   dict(offload_device="disk", computation_device="cpu",
                                        computation_dtype=torch.float32), disk_map=dm)
    rounded = Net().eval()
    with torch.no_grad():
        for mine, theirs in zip(rounded.parameters(), eager.parameters()):
            mine.copy_(theirs.half().float())
        assert torch.equal(rounded(X), model(X))


class FakeOriginalDiskMap:
    """The attributes DiffSynth-Studio's DiskMap has (its class is never imported by vramfx)."""

    def __init__(self, path, device, torch_dtype=None, state_dict_converter=None):
        self.path = path if isinstance(path, list) else [path]
        self.device = device
        self.torch_dtype = torch_dtype
        names = {k: k for k in load_state_dict(self.path)}
        self.rename_dict = state_dict_converter(names) if state_dict_converter is not None else None


FakeOriginalDiskMap.__name__ = "DiskMap"
FakeOriginalDiskMap.__module__ = "diffsynth.core.vram.disk_map"


@pytest.mark.parametrize("path", ["model.safetensors", "model.pt"])
def test_the_originals_diskmap_object_is_read_as_it_reads(saved, path):
    eager, folder = saved
    original = FakeOriginalDiskMap(str(folder / path), "cpu", state_dict_converter=checkpoint_names)
    source = source_of(original)
    assert sorted(source) == ["first.bias", "first.weight", "second.bias", "second.weight"]
    model = enable_vram_management(empty(), {torch.nn.Linear: AutoWrappedLinear},
                                   dict(offload_device="disk", computation_device="cpu"), disk_map=original)
    with torch.no_grad():
        assert torch.equal(eager(X), model(X))
    assert source_of(object()) is None and source_of({"w": torch.ones(1)}) is None


@pytest.mark.parametrize(
    ("converter", "match"),
    [
        (lambda sd: {"w": torch.ones(1)}, "returned Tensor for 'w'; a DiskMap can only rename keys"),
        (lambda sd: {"a": "x", "b": "x"}, "gives the stored tensor 'x' two names"),
        (lambda sd: {"a": "nowhere"}, "returned str for 'a'"),
    ],
)
def test_a_converter_that_does_more_than_rename_is_refused(converter, match):
    with pytest.raises(ValueError, match=match):
        converter_key_map(["x", "y"], converter)


def test_load_state_dict_takes_the_originals_calls(saved, tmp_path):
    eager, folder = saved
    expected = {k: v.half() for k, v in load_state_dict(folder / "model.safetensors").items()}
    for got in (
        load_state_dict(str(folder / "model.safetensors"), torch.float16, "cpu"),  # (path, torch_dtype, device)
        load_state_dict(str(folder / "model.pt"), torch_dtype=torch.float16, device="cpu", verbose=1),
    ):
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    torch.save({"model_state": {"extra": torch.ones(2)}}, tmp_path / "extra.pth")
    mixed = load_state_dict([str(folder / "model.safetensors"), str(tmp_path / "extra.pth")])
    assert set(mixed) == set(expected) | {"extra"}
    with pytest.raises(vramfx.WeightsError, match="'extra' is in two of the files"):
        load_state_dict([str(tmp_path / "extra.pth"), str(tmp_path / "extra.pth")])
    with pytest.raises(ValueError, match="dtype=torch.float16 and torch_dtype=torch.bfloat16 differ"):
        load_state_dict(folder / "model.pt", dtype=torch.float16, torch_dtype=torch.bfloat16)
