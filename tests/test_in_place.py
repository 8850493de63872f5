"""CPU weights used in place from the page cache: a DiskMap file's 64-byte aligned tensors are
viewed where they lie in a mapping of the file, never copied, outside the RssAnon budget; outputs
stay bit-identical to eager."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx.budget import rss_file_bytes
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.plan.plan import Plan


def _aligned_copy(folder, name="aligned"):
    return vramfx.convert(folder, folder.parent / name, dtype=None)


def test_convert_without_a_dtype_lays_data_out_aligned(tmp_path):
    tensors = {"odd": torch.randn(3), "w": torch.randn(64, 64), "b": torch.randn(64), "i": torch.arange(5)}
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")
    out = vramfx.convert(tmp_path / "m.safetensors", tmp_path / "a.safetensors", dtype=None)
    with vramfx.DiskMap(out) as dm:
        for key, value in tensors.items():
            info = dm.info(key)
            assert info.dtype == value.dtype and torch.equal(dm[key], value)
            if info.nbytes % 64 == 0:
                assert info.offset % 64 == 0, key
    assert safetensors.torch.load_file(out).keys() == tensors.keys()  # still an ordinary file


def test_mapped_views_aligned_bytes_only(tmp_path):
    safetensors.torch.save_file({"a": torch.randn(3), "b": torch.randn(16, 16)}, tmp_path / "m.safetensors")
    with vramfx.DiskMap(tmp_path / "m.safetensors") as dm:
        for key in dm:
            raw = dm.mapped(key)
            if dm.info(key).offset % 64:
                assert raw is None
            else:
                assert raw.data_ptr() % 64 == 0
                assert torch.equal(raw.view(dm.info(key).dtype).view(dm.info(key).shape), dm[key])
    out = vramfx.convert(tmp_path / "m.safetensors", tmp_path / "a.safetensors", dtype=None)
    dm = vramfx.DiskMap(out)
    view = dm.mapped("b")
    dm.close()
    assert torch.equal(view.view(torch.float32).view(16, 16), safetensors.torch.load_file(out)["b"])  # outlives close


def test_in_place_weights_equal_eager_outside_the_budget(tmp_path):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path / "saved")
    aligned = _aligned_copy(tmp_path / "saved")
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(aligned)
    weight_bytes = weights.nbytes
    empty = build_empty(arch)
    fast = vramfx.compile(empty, budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs)
    plan = fast.plan
    assert plan.in_place and plan.in_place_bytes > weight_bytes // 2
    assert set(plan.in_place) <= set(plan.resident)
    release_freed_memory()
    file_before = rss_file_bytes()
    with PeakMemory("cpu") as peak:
        assert_same_output(expected, fast(**inputs))
        assert_same_output(expected, fast(**inputs))
    # The weights' pages are the file's (RssFile), not the process's own memory (RssAnon).
    assert peak.growth_bytes <= plan.budget_bytes
    assert peak.growth_bytes < plan.in_place_bytes
    assert rss_file_bytes() >= file_before


def test_unaligned_weights_are_copied_and_bypass_copies_all(tmp_path):
    arch = ARCHS["wan"]
    eager = build_saved(arch, tmp_path / "saved")
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(tmp_path / "saved")
    aligned = {k for k in weights if weights.mapped(k) is not None}
    fast = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs)
    assert set(fast.plan.in_place) == {n for n in fast.plan.resident if n in aligned} and set(fast.plan.in_place) <= aligned
    assert_same_output(expected, fast(**inputs))
    direct = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs,
                            bypass_page_cache=True)
    assert direct.plan.in_place == () and direct.plan.in_place_bytes == 0
    assert_same_output(expected, direct(**inputs))


def test_host_weights_are_not_in_place():
    model = torch.nn.Linear(8, 8).eval()
    fast = vramfx.compile(build_meta_linear(), budget="16MiB", weights=model.state_dict(), device="cpu",
                          example_args=(torch.ones(1, 8),))
    assert fast.plan.in_place == ()
    assert torch.equal(fast(torch.ones(1, 8)), model(torch.ones(1, 8)))


def build_meta_linear():
    with vramfx.skip_model_initialization():
        return torch.nn.Linear(8, 8).eval()


def test_a_plan_with_in_place_weights_round_trips(tmp_path):
    arch = ARCHS["bert"]
    build_saved(arch, tmp_path / "saved")
    weights = vramfx.DiskMap(_aligned_copy(tmp_path / "saved"))
    fast = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu",
                          example_kwargs=arch.inputs())
    plan = fast.plan
    assert plan.in_place
    assert Plan.from_json(plan.to_json()) == plan
    assert "in place" in plan.summary()


def test_a_weights_file_changed_under_in_place_weights_is_an_error_on_the_next_call(tmp_path):
    import os

    arch = ARCHS["bert"]
    eager = build_saved(arch, tmp_path / "saved")
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    path = _aligned_copy(tmp_path / "saved") / "model.safetensors"
    with vramfx.DiskMap(path) as weights:
        fast = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs)
        assert fast.plan.in_place
        stat = path.stat()
        with open(path, "ab") as f:
            f.write(b"\0" * 8)
        with pytest.raises(vramfx.WeightsError, match=r"model\.safetensors changed since it was opened"):
            fast(**inputs)
        os.truncate(path, stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert_same_output(expected, fast(**inputs))
        fast.release()


def test_the_plan_still_counts_in_place_weights_in_its_weight_bytes(tmp_path):
    from vramfx.plan.check import check_plan
    from vramfx.plan.in_place import with_in_place, without_in_place
    from vramfx.plan.schedule import schedule
    from vramfx.plan.types import Liveness, WeightLife

    live = Liveness(num_positions=2, weights=(WeightLife("a", 4096, (0,), ((0, 1),)), WeightLife("b", 4096, (1,), ((1, 2),))),
                    activation_bytes=(64, 64), flops=(0.0, 0.0), memory_bytes=(0, 0))
    stripped = without_in_place(live, {"a"})
    plan = with_in_place(schedule(stripped, 2**16, cost_model=vramfx.CostModel.for_device("cpu")), live, {"a"})
    assert plan.in_place == ("a",) and plan.in_place_bytes == 4096 and plan.weight_bytes == 8192
    assert plan.name_to_weight["a"].nbytes == 0
    check_plan(plan, stripped)


def test_in_place_can_be_turned_off(tmp_path):
    arch = ARCHS["bert"]
    eager = build_saved(arch, tmp_path / "saved")
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(_aligned_copy(tmp_path / "saved"))
    fast = vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", example_kwargs=inputs,
                          in_place=False)
    assert fast.plan.in_place == () and fast.plan.resident_bytes + fast.plan.streamed_bytes > 0
    assert_same_output(expected, fast(**inputs))
    with pytest.raises(TypeError, match="in_place"):
        vramfx.compile(build_empty(arch), budget="24MiB", weights=weights, device="cpu", in_place="no")
