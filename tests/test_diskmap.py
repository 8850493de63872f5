"""DiskMap: sources, lazy reads, read_into, validation of bad files, file lifetime."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

from vramfx import DiskMap, WeightsError, load_state_dict, skip_model_initialization
from vramfx.storage import diskmap as diskmap_mod
from vramfx.storage.safetensors_header import SAFETENSORS_DTYPES
from vramfx.storage.source import TensorInfo, WeightSource


def _tensors() -> dict[str, torch.Tensor]:
    """A few tensors of odd sizes, so data offsets are not aligned in the file."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.float16),
        "b.ids": torch.arange(7, dtype=torch.int64),
        "b.mask": torch.tensor([True, False, True]),
        "c.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "c.empty": torch.zeros(0, 4),
    }


@pytest.fixture
def one_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path, tensors


def _write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file with exactly the given header and data area, valid or not."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


# -- Reading ---------------------------------------------------------------------------------


def test_reads_every_tensor_equal_and_aligned(one_file):
    path, tensors = one_file
    with DiskMap(path) as dm:
        assert set(dm) == set(tensors)
        assert len(dm) == len(tensors)
        for key, expected in tensors.items():
            got = dm[key]
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)
            if got.numel():
                # Torch's own CPU allocations are 64-byte aligned; kernels pick paths by alignment.
                assert got.data_ptr() % 64 == 0


def test_raw_offsets_are_unaligned_but_diskmap_tensors_are(one_file):
    path, _ = one_file
    mapped = safetensors.torch.load_file(path)
    with DiskMap(path) as dm:
        offsets = {k: dm.info(k).offset % 64 for k in dm if dm.info(k).nbytes}
        assert any(offsets.values()), "the fixture should have tensors at unaligned file offsets"
        assert all(dm[k].data_ptr() % 64 == 0 for k in offsets)
        assert all(torch.equal(dm[k], mapped[k]) for k in offsets)


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_round_trips(tmp_path, name):
    dtype = SAFETENSORS_DTYPES[name]
    raw = torch.arange(24, dtype=torch.uint8) * 5  # 24 bytes: a whole number of every itemsize
    header = {"t": {"dtype": name, "shape": [24 // dtype.itemsize], "data_offsets": [0, 24]}}
    path = _write_raw(tmp_path / "t.safetensors", header, bytes(raw.tolist()))
    with DiskMap(path) as dm:
        got = dm["t"]
        assert got.dtype == dtype and got.shape == (24 // dtype.itemsize,)
        assert torch.equal(got.view(torch.uint8), raw)


def test_info_without_reading(one_file, monkeypatch):
    path, tensors = one_file
    with DiskMap(path) as dm:
        monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("info must not read data"))
        info = dm.info("a.weight")
        assert isinstance(info, TensorInfo)
        assert info.shape == (3, 5) and info.dtype == torch.float32 and info.nbytes == 60
        assert info.file == str(path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            assert f.read(info.nbytes) == tensors["a.weight"].numpy().tobytes()
        assert dm.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert dm.files == [str(path)]
        assert "a.weight" in dm and "nope" not in dm
        assert isinstance(dm, WeightSource)


def test_dtype_casts_floating_only_and_info_keeps_stored(one_file):
    path, tensors = one_file
    with DiskMap(path, dtype=torch.bfloat16) as dm:
        assert dm["a.weight"].dtype == torch.bfloat16
        assert torch.equal(dm["a.weight"], tensors["a.weight"].to(torch.bfloat16))
        assert dm["b.ids"].dtype == torch.int64
        assert dm["b.mask"].dtype == torch.bool
        assert dm.info("a.weight").dtype == torch.float32
        assert dm.info("a.weight").nbytes == 60


def test_key_map_dict_and_callable(one_file):
    path, tensors = one_file
    with DiskMap(path, key_map={"a.weight": "w"}) as dm:
        assert "w" in dm and "a.weight" not in dm and "a.bias" in dm
        assert torch.equal(dm["w"], tensors["a.weight"])
    with DiskMap(path, key_map=lambda k: None if k.startswith("b.") else "x." + k) as dm:
        assert set(dm) == {"x." + k for k in tensors if not k.startswith("b.")}


def test_key_map_collision_is_an_error(one_file):
    path, _ = one_file
    with pytest.raises(WeightsError, match="renames two tensors to 'same'"):
        DiskMap(path, key_map=lambda k: "same")


def test_bad_arguments(one_file):
    path, _ = one_file
    with pytest.raises(ValueError, match="dtype="):
        DiskMap(path, dtype="float16")
    with pytest.raises(ValueError, match="key_map="):
        DiskMap(path, key_map=3)
    with pytest.raises(ValueError, match="source="):
        DiskMap(3)
    with pytest.raises(ValueError, match="empty list"):
        DiskMap([])


# -- read_into -------------------------------------------------------------------------------


def test_read_into_copies_raw_bytes(one_file):
    path, tensors = one_file
    with DiskMap(path, dtype=torch.float16) as dm:
        out = torch.empty(dm.info("a.weight").nbytes, dtype=torch.uint8)
        dm.read_into("a.weight", out)
        assert torch.equal(out.view(torch.float32).view(3, 5), tensors["a.weight"])
        dm.read_into("c.empty", torch.empty(0, dtype=torch.uint8))


def test_read_into_checks_out(one_file):
    path, _ = one_file
    with DiskMap(path) as dm:
        with pytest.raises(ValueError, match="60 bytes"):
            dm.read_into("a.weight", torch.empty(59, dtype=torch.uint8))
        with pytest.raises(ValueError, match="uint8"):
            dm.read_into("a.weight", torch.empty(15, dtype=torch.float32))
        with pytest.raises(ValueError, match="contiguous"):
            dm.read_into("a.weight", torch.empty(120, dtype=torch.uint8)[::2])


def test_read_into_from_many_threads(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(1000 + i, generator=g) for i in range(64)}
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(tensors, path)
    with DiskMap(path) as dm:

        def read(key: str, bypass: bool) -> bool:
            out = torch.empty(dm.info(key).nbytes, dtype=torch.uint8)
            dm.read_into(key, out, bypass_page_cache=bypass)
            return torch.equal(out.view(torch.float32), tensors[key])

        with ThreadPoolExecutor(8) as pool:
            jobs = [(k, i % 2 == 0) for i, k in enumerate(list(tensors) * 4)]
            assert all(pool.map(lambda job: read(*job), jobs))


@pytest.mark.parametrize("bypass", [False, True])
def test_read_range_into_reads_any_slice_of_a_tensor(tmp_path, bypass):
    tensors = {"pad": torch.ones(1001, dtype=torch.uint8), "big": torch.randn(300_001)}
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(tensors, path)
    raw = tensors["big"].view(torch.uint8)
    with DiskMap(path) as dm:
        for start, size in [(0, 7), (4093, 5000), (raw.numel() - 3, 3), (17, 0)]:
            out = torch.empty(size, dtype=torch.uint8)
            dm.read_range_into("big", start, out, bypass_page_cache=bypass)
            assert torch.equal(out, raw[start : start + size])
        with pytest.raises(ValueError, match="within the 1200004 bytes"):
            dm.read_range_into("big", raw.numel() - 3, torch.empty(4, dtype=torch.uint8))


def test_bypass_page_cache_reads_same_bytes(tmp_path):
    # Larger than one bounce chunk and not aligned at either end.
    tensors = {"pad": torch.ones(1001, dtype=torch.uint8), "big": torch.randn(2_300_001)}
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(tensors, path)
    with DiskMap(path) as dm:
        for key, expected in tensors.items():
            out = torch.empty(dm.info(key).nbytes, dtype=torch.uint8)
            dm.read_into(key, out, bypass_page_cache=True)
            assert torch.equal(out.view(expected.dtype), expected.reshape(-1))


def test_bypass_falls_back_with_one_warning_when_o_direct_refused(one_file, monkeypatch, caplog):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path, tensors = one_file
    real_open = os.open

    def refusing_open(p, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    with DiskMap(path) as dm:
        monkeypatch.setattr(os, "open", refusing_open)
        with caplog.at_level(logging.WARNING, logger="vramfx.storage.diskmap"):
            for _ in range(3):
                out = torch.empty(60, dtype=torch.uint8)
                dm.read_into("a.weight", out, bypass_page_cache=True)
                assert torch.equal(out.view(torch.float32).view(3, 5), tensors["a.weight"])
        assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1


def test_bypass_falls_back_when_o_direct_read_is_refused(tmp_path, monkeypatch, caplog):
    tensors = {f"t{i}": torch.randn(10 + i) for i in range(3)}
    for i in range(2):
        safetensors.torch.save_file({k + str(i): v for k, v in tensors.items()}, tmp_path / f"{i}.safetensors")
    real_preadv = diskmap_mod._preadv
    direct_fds = set()

    def refusing_preadv(fd, view, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, view, offset)

    with DiskMap(tmp_path) as dm:
        monkeypatch.setattr(diskmap_mod, "_preadv", refusing_preadv)
        real_direct_fd = DiskMap._direct_fd

        def spy(self, f):
            fd = real_direct_fd(self, f)
            if fd is not None:
                direct_fds.add(fd)
            return fd

        monkeypatch.setattr(DiskMap, "_direct_fd", spy)
        with caplog.at_level(logging.WARNING, logger="vramfx.storage.diskmap"):
            for key in list(dm) * 2:
                out = torch.empty(dm.info(key).nbytes, dtype=torch.uint8)
                dm.read_into(key, out, bypass_page_cache=True)
                assert torch.equal(out.view(torch.float32), tensors[key[:-1]])
    if not direct_fds:
        pytest.skip("this filesystem refuses O_DIRECT at open; covered by the test above")
    assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1


def test_evict_page_cache_keeps_data_readable(one_file):
    path, tensors = one_file
    with DiskMap(path) as dm:
        dm.evict_page_cache()
        assert torch.equal(dm["a.weight"], tensors["a.weight"])


# -- Sources: a real sharded architecture ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder, model, config


@pytest.mark.parametrize("how", ["folder", "index", "files"])
def test_sharded_transformers_model_loads_from_every_source(llama_folder, how):
    folder, model, _ = llama_folder
    source = {
        "folder": folder,
        "index": folder / "model.safetensors.index.json",
        "files": sorted(folder.glob("*.safetensors")),
    }[how]
    expected = model.state_dict()
    with DiskMap(source) as dm:
        assert len(dm.files) > 1
        assert set(dm) == set(expected)
        for key in dm:
            assert torch.equal(dm[key], expected[key])


def test_skip_init_model_with_diskmap_matches_original(llama_folder):
    transformers = pytest.importorskip("transformers")
    folder, model, config = llama_folder
    with skip_model_initialization():
        empty = transformers.LlamaForCausalLM(config).eval()
    with DiskMap(folder) as dm:
        result = empty.load_state_dict(dm, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, model(ids).logits)


# -- Validation at open: one test per defect -------------------------------------------------


def test_header_length_past_end_of_file(tmp_path):
    path = _write_raw(tmp_path / "bad.safetensors", {}, b"", header_len=10_000)
    with pytest.raises(WeightsError, match=r"bad\.safetensors: header length 10000 bytes runs past the end"):
        DiskMap(path)


def test_absurdly_large_header_in_a_file_that_holds_it(tmp_path):
    # A sparse file larger than the header: the length is refused for being absurd, not for
    # running past the end (which the message used to claim).
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(8 + 200_000_000 + 16)
    with pytest.raises(WeightsError, match=r"huge\.safetensors: header length 200000000 bytes is over the 100000000 byte limit"):
        DiskMap(path)


def test_file_too_short_for_header(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(WeightsError, match=r"short\.safetensors: file is 3 bytes, too short"):
        DiskMap(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: header is not valid UTF-8 JSON"):
        DiskMap(path)


def test_offsets_outside_data_area(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    path = _write_raw(tmp_path / "trunc.safetensors", header, b"\0" * 8)
    with pytest.raises(WeightsError, match=r"trunc\.safetensors: tensor 'w' has data_offsets \[0, 16\] outside the data area of 8 bytes"):
        DiskMap(path)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = _write_raw(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    with pytest.raises(WeightsError, match=r"overlap\.safetensors: the data of tensors 'a' and 'b' overlap"):
        DiskMap(path)


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}
    path = _write_raw(tmp_path / "dtype.safetensors", header, b"\0" * 4)
    with pytest.raises(WeightsError, match=r"dtype\.safetensors: tensor 'w' has unknown dtype 'F17'"):
        DiskMap(path)


def test_shape_does_not_match_byte_length(tmp_path):
    header = {"w": {"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 8]}}
    path = _write_raw(tmp_path / "shape.safetensors", header, b"\0" * 8)
    with pytest.raises(WeightsError, match=r"shape\.safetensors: tensor 'w' has shape \[3, 2\] of F16 \(12 bytes\) but data_offsets \[0, 8\] span 8 bytes"):
        DiskMap(path)


def _index_copy(folder: Path, dest: Path, **weight_map: str) -> Path:
    """Links to ``folder``'s shards in ``dest`` and a copy of its index with ``weight_map`` merged."""
    for shard in folder.glob("*.safetensors"):
        (dest / shard.name).symlink_to(shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].update(weight_map)
    path = dest / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    return path


def test_index_names_missing_shard(llama_folder, tmp_path):
    folder, _, _ = llama_folder
    index = _index_copy(folder, tmp_path, **{"model.norm.weight": "model-00009-of-00009.safetensors"})
    with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json names shard 'model-00009-of-00009\.safetensors', which does not exist"):
        DiskMap(index)


def test_index_maps_key_to_shard_that_lacks_it(llama_folder, tmp_path):
    folder, _, _ = llama_folder
    _index_copy(folder, tmp_path, **{"not.in.any.shard": "model-00001-of-00004.safetensors"})
    with pytest.raises(WeightsError, match=r"maps tensor 'not\.in\.any\.shard' to model-00001-of-00004\.safetensors, which does not hold it"):
        DiskMap(tmp_path)


def test_same_key_in_two_shards_names_both(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "one.safetensors")
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "two.safetensors")
    with pytest.raises(WeightsError, match=r"tensor 'w' is in two files: .*one\.safetensors and .*two\.safetensors"):
        DiskMap(tmp_path)


def test_folder_without_safetensors(tmp_path):
    with pytest.raises(WeightsError, match="holds no \\*.safetensors files"):
        DiskMap(tmp_path)


def test_folder_with_two_indexes(tmp_path):
    for name in ("a.safetensors.index.json", "b.safetensors.index.json"):
        (tmp_path / name).write_text('{"weight_map": {}}')
    with pytest.raises(WeightsError, match="several indexes"):
        DiskMap(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        DiskMap(tmp_path / "nope.safetensors")


def test_pickle_checkpoint_is_refused_with_advice(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(WeightsError, match="pickle checkpoint; DiskMap streams safetensors only"):
        DiskMap(path)


def test_failed_construction_leaves_no_fd_open(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    _write_raw(tmp_path / "b.safetensors", {}, b"", header_len=999)
    before = _open_fds()
    with pytest.raises(WeightsError):
        DiskMap(tmp_path)
    assert _open_fds() == before


# -- Files that change after open ------------------------------------------------------------


def test_file_that_grew_is_an_error_on_read(one_file):
    path, _ = one_file
    with DiskMap(path) as dm:
        with open(path, "ab") as f:
            f.write(b"\0")
        with pytest.raises(WeightsError, match=r"model\.safetensors changed since it was opened.*reopen the DiskMap"):
            dm["a.weight"]


def test_file_with_new_mtime_is_an_error_on_read(one_file):
    path, _ = one_file
    with DiskMap(path) as dm:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(WeightsError, match="changed since it was opened"):
            dm.read_into("a.weight", torch.empty(60, dtype=torch.uint8))


def test_replaced_file_is_an_error_on_read(one_file):
    path, _ = one_file
    with DiskMap(path) as dm:
        path.unlink()
        safetensors.torch.save_file(_tensors(), path)
        with pytest.raises(WeightsError, match="replaced by another file since it was opened"):
            dm["a.weight"]


def test_removed_file_is_an_error_on_read(one_file):
    path, _ = one_file
    with DiskMap(path) as dm:
        path.unlink()
        with pytest.raises(WeightsError, match="removed since it was opened"):
            dm["a.weight"]


# -- Lifetime --------------------------------------------------------------------------------


def test_close_and_context_manager_close_fds(one_file):
    path, _ = one_file
    before = _open_fds()
    with DiskMap(path) as dm:
        dm.read_into("a.weight", torch.empty(60, dtype=torch.uint8), bypass_page_cache=True)
        assert len(_open_fds()) > len(before) or not before
    assert _open_fds() == before
    with pytest.raises(ValueError, match="closed"):
        dm.read_into("a.weight", torch.empty(60, dtype=torch.uint8))
    dm.close()  # twice is fine


def test_garbage_collection_closes_fds(one_file):
    path, _ = one_file
    before = _open_fds()
    dm = DiskMap(path)
    del dm
    assert _open_fds() == before


def test_pickles_as_its_arguments_and_checks_files(one_file):
    path, tensors = one_file
    with DiskMap(path, key_map={"a.weight": "w"}) as dm:
        blob = pickle.dumps(dm)
    with pickle.loads(blob) as again:
        assert torch.equal(again["w"], tensors["a.weight"])
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match="changed since the DiskMap was pickled"):
        pickle.loads(blob)


@pytest.mark.parametrize(("device", "error"), [("gpu", ValueError), (1.5, TypeError)])
def test_a_device_that_is_not_one_is_refused_by_name(tmp_path, device, error):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(error, match=r"device"):
        DiskMap(tmp_path, device=device)
    with pytest.raises(error, match=r"device"):
        load_state_dict(tmp_path, device=device)


def test_cached_fractions_say_what_the_page_cache_holds_and_read_nothing(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.randn(4096), "b": torch.randn(64)}, path)
    with DiskMap(path) as dm:
        for key in dm:
            dm[key]
        monkeypatch.setattr(DiskMap, "read_into", lambda *a, **k: pytest.fail("cached_fractions read data"))
        fractions = dm.cached_fractions()
        if not sys.platform.startswith("linux"):
            assert fractions is None
            return
        assert fractions == {"a": 1.0, "b": 1.0}  # just read: in the page cache
        assert dm.cached_fractions(["b"]) == {"b": 1.0}
        os.sync()
        dm.evict_page_cache()
        assert all(0.0 <= f <= 1.0 for f in dm.cached_fractions().values())
