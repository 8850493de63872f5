"""GGUFMap: a GGUF file read lazily, each tensor a checked byte range, decoded like the reference."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

import vramfx
from gguf_files import QUANTIZED, gguf, write_gguf
from vramfx.errors import WeightsError


def _all_types(path, rng):
    """One tensor per supported type, a plain one with a recorded original shape, an unsupported one."""
    tensors = {f"w.{q}": (rng.standard_normal((4, 512)).astype(np.float32), q) for q in QUANTIZED}
    tensors.update({f"w.{q}": (rng.standard_normal((3, 64)).astype(np.float32), q) for q in ("F32", "F16", "BF16")})
    reference = write_gguf(path, tensors)
    return reference


def test_every_type_reads_as_the_reference_dequantization(tmp_path):
    reference = _all_types(tmp_path / "all.gguf", np.random.default_rng(0))
    with vramfx.GGUFMap(tmp_path / "all.gguf") as weights:
        assert sorted(weights) == sorted(reference)
        for name, expected in reference.items():
            qtype = name.split(".")[1]
            got = weights[name]
            assert got.shape == expected.shape
            assert torch.equal(got.float(), expected), name
            decoder = weights.decoder(name)
            header = weights.tensors[name]
            assert weights.info(name).nbytes == header.nbytes
            if qtype in QUANTIZED:
                assert decoder.format == qtype and decoder.nbytes == header.nbytes
                assert weights.info(name).shape == (header.nbytes,) and weights.info(name).dtype == torch.uint8
            else:
                assert decoder is None and weights.info(name).shape == expected.shape


def test_reads_are_byte_ranges_of_the_file(tmp_path):
    _all_types(tmp_path / "all.gguf", np.random.default_rng(1))
    weights = vramfx.GGUFMap(tmp_path / "all.gguf")
    data = (tmp_path / "all.gguf").read_bytes()
    info = weights.info("w.Q4_K")
    out = torch.empty(100, dtype=torch.uint8)
    weights.read_range_into("w.Q4_K", 50, out)
    assert bytes(out.tolist()) == data[info.offset + 50 : info.offset + 150]
    assert weights.from_disk and weights.metadata["general.architecture"] == "llama"


def test_the_file_is_not_kept_mapped(tmp_path):
    """The header is parsed from a memory map that is dropped: reads are preads, nothing maps the file."""
    _all_types(tmp_path / "all.gguf", np.random.default_rng(2))
    weights = vramfx.GGUFMap(tmp_path / "all.gguf")
    weights["w.Q8_0"]
    with open("/proc/self/maps") as maps:
        assert str(tmp_path / "all.gguf") not in maps.read()
    weights.close()


def test_a_modified_file_is_an_error_on_read(tmp_path):
    _all_types(tmp_path / "all.gguf", np.random.default_rng(3))
    weights = vramfx.GGUFMap(tmp_path / "all.gguf")
    with open(tmp_path / "all.gguf", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(WeightsError, match="changed since it was opened"):
        weights["w.Q4_K"]


def test_original_shapes_and_unsupported_types(tmp_path, caplog):
    """ComfyUI-GGUF records the real shape of tensors it stored flattened; types vramfx does not
    decode are left out with a warning, so a model needing them reports them missing."""
    rng = np.random.default_rng(4)
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "wan")
    conv = rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float32)
    writer.add_tensor("patch_embedding.weight", conv.reshape(8, 16).astype(np.float16))
    writer.add_array("comfy.gguf.orig_shape.patch_embedding.weight", list(conv.shape))
    writer.add_tensor("iq", np.zeros((2, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with caplog.at_level("WARNING"):
        weights = vramfx.GGUFMap(tmp_path / "odd.gguf")
    assert list(weights) == ["patch_embedding.weight"] and "IQ4_NL" in caplog.text
    assert torch.equal(weights["patch_embedding.weight"], torch.from_numpy(conv.astype(np.float16)))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda data: b"NOPE" + data[4:], "not a valid GGUF file"),
        (lambda data: data[: len(data) - 200], "truncated|not a valid GGUF"),
        (lambda data: b"", "not a valid GGUF file"),
    ],
    ids=["magic", "truncated", "empty"],
)
def test_broken_files_are_refused_at_open(tmp_path, damage, match):
    _all_types(tmp_path / "all.gguf", np.random.default_rng(5))
    (tmp_path / "bad.gguf").write_bytes(damage((tmp_path / "all.gguf").read_bytes()))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(WeightsError, match=match):
        vramfx.GGUFMap(tmp_path / "bad.gguf")
    assert len(os.listdir("/proc/self/fd")) == fds, "a failed open leaves no file open"


def test_arguments_and_the_missing_package(tmp_path, monkeypatch):
    _all_types(tmp_path / "all.gguf", np.random.default_rng(6))
    with pytest.raises(ValueError, match="layout must be"):
        vramfx.GGUFMap(tmp_path / "all.gguf", layout="comfy")
    with pytest.raises(WeightsError, match="does not exist"):
        vramfx.GGUFMap(tmp_path / "missing.gguf")
    renamed = vramfx.GGUFMap(tmp_path / "all.gguf", key_map={"w.Q8_0": "layer.weight"})
    assert "layer.weight" in renamed and "w.Q8_0" not in renamed
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'vramfx\[gguf\]'"):
        vramfx.GGUFMap(tmp_path / "all.gguf")


def test_pickles_as_its_arguments(tmp_path):
    reference = _all_types(tmp_path / "all.gguf", np.random.default_rng(7))
    weights = pickle.loads(pickle.dumps(vramfx.GGUFMap(tmp_path / "all.gguf")))
    assert torch.equal(weights["w.Q6_K"], reference["w.Q6_K"])


def test_compile_and_inspect_open_gguf_paths(tmp_path):
    from vramfx.storage.formats import open_weights
    from vramfx.weights import as_source

    _all_types(tmp_path / "all.gguf", np.random.default_rng(8))
    assert isinstance(open_weights(tmp_path / "all.gguf"), vramfx.GGUFMap)
    assert isinstance(as_source(str(tmp_path / "all.gguf")), vramfx.GGUFMap)

