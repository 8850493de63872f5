"""The bad-input catalogue: each case, end to end through the public API, fails clearly and cleanly.

One test (or a parametrized few) per case of ``docs/reliability.md``. Every test checks the
error type and message, and that nothing is left half-done: no file descriptor left open (counted
in ``/proc/self/fd``), no thread left running, and, where it makes sense, the object still usable
(a DiskMap reads again after a failed read, a CompiledModule gives eager's output on the call
after a failed one). The focused tests of each module (``test_diskmap.py``, ``test_weights.py``,
...) cover the details; this file checks the whole path a user takes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import vramfx
from tiny_models import ARCHS, build_empty, build_saved, further_graph_bytes, streaming_budget

LLAMA = ARCHS["llama"]
FILE = "model.safetensors"


def open_fds() -> set[str]:
    """This process's open file descriptors, as the names under /proc/self/fd."""
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


@contextlib.contextmanager
def nothing_left_behind() -> Iterator[None]:
    """Assert that the block leaves no file descriptor open and no thread running."""
    gc.collect()
    fds, threads = open_fds(), {t.ident for t in threading.enumerate()}
    yield
    gc.collect()
    assert open_fds() == fds, "file descriptors left open"
    assert {t.ident for t in threading.enumerate()} == threads, "threads left running"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama saved as one safetensors file, its eager output, and a budget that streams."""
    folder = tmp_path_factory.mktemp("llama")
    eager = build_saved(LLAMA, folder)
    inputs = LLAMA.inputs()
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    with vramfx.DiskMap(folder) as weights:
        budget = streaming_budget(build_empty(LLAMA), weights, inputs)
    return {"folder": folder, "eager": eager, "inputs": inputs, "expected": expected, "budget": budget}


def copy_file(llama: dict[str, Any], dest: Path) -> Path:
    """A private copy of the checkpoint file, to corrupt."""
    path = dest / FILE
    shutil.copyfile(llama["folder"] / FILE, path)
    return path


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite ``path``'s safetensors header through ``edit``, keeping the data area."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def compile_from(weights: object, llama: dict[str, Any], **kwargs: Any) -> vramfx.CompiledModule:
    """``vramfx.compile`` of an empty tiny Llama with ``weights``, planned at once."""
    options = {"budget": llama["budget"], "device": "cpu", "example_kwargs": llama["inputs"], **kwargs}
    return vramfx.compile(build_empty(LLAMA), weights=weights, **options)


def assert_refused(path: Path, llama: dict[str, Any], match: str) -> None:
    """The checkpoint at ``path`` is refused with ``match`` by compile, DiskMap and load_state_dict."""
    with nothing_left_behind():
        with pytest.raises(vramfx.WeightsError, match=match):
            compile_from(path, llama)
        with pytest.raises(vramfx.WeightsError, match=match):
            vramfx.DiskMap(path)
        with pytest.raises(vramfx.WeightsError, match=match):
            vramfx.load_state_dict(path)


def streaming(llama: dict[str, Any], weights: vramfx.DiskMap) -> vramfx.CompiledModule:
    """A compiled tiny Llama that streams from ``weights``, checked once against eager."""
    fast = compile_from(weights, llama)
    assert fast.plan.streamed_bytes > 0
    assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
    return fast


# ---------------------------------------------------------------------------------------------
# Checkpoint files (cases 1-8): refused when opened, before anything is planned or allocated


def test_01_truncated_safetensors_file(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    assert_refused(path, llama, r"model\.safetensors: tensor '.*' has data_offsets .* outside the data area "
                                r"of \d+ bytes; the file is truncated or corrupt")


def test_02_header_length_larger_than_the_file(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2 * size))
    assert_refused(path, llama, rf"header length {2 * size} bytes runs past the end of the file \({size} bytes\)")


def _overlap(header: dict) -> None:
    header["layers.0.post_attention_layernorm.weight"]["data_offsets"] = header["layers.0.input_layernorm.weight"][
        "data_offsets"
    ]


def _out_of_range(header: dict) -> None:
    begin, end = header["norm.weight"]["data_offsets"]
    header["norm.weight"]["data_offsets"] = [begin + 1024, end + 1024]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_overlap, r"the data of tensors 'layers\.0\.input_layernorm\.weight' and "
                   r"'layers\.0\.post_attention_layernorm\.weight' overlap"),
        (_out_of_range, r"tensor 'norm\.weight' has data_offsets \[\d+, \d+\] outside the data area"),
    ],
    ids=["overlapping", "out_of_range"],
)
def test_03_overlapping_or_out_of_range_offsets(llama, tmp_path, edit, match):
    path = copy_file(llama, tmp_path)
    edit_header(path, edit)
    assert_refused(path, llama, match)


def test_04_unknown_dtype(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    edit_header(path, lambda h: h["norm.weight"].update(dtype="F17"))
    assert_refused(path, llama, r"tensor 'norm\.weight' has unknown dtype 'F17' \(known: F64, F32")


def test_05_shape_times_itemsize_is_not_the_byte_length(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    edit_header(path, lambda h: h["norm.weight"].update(shape=[65]))
    assert_refused(path, llama, r"tensor 'norm\.weight' has shape \[65\] of F32 \(260 bytes\) but data_offsets "
                                r"\[\d+, \d+\] span 256 bytes")


def test_06_header_that_is_not_utf8(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(raw))
    assert_refused(path, llama, r"model\.safetensors: header is not valid UTF-8 JSON")


def test_06_absurdly_large_header(llama, tmp_path):
    path = tmp_path / FILE
    with open(path, "wb") as f:  # sparse: the file really is longer than the header it claims
        f.write(struct.pack("<Q", 10**9))
        f.truncate(8 + 10**9 + 64)
    assert_refused(path, llama, r"header length 1000000000 bytes is over the 100000000 byte limit of safetensors")


@pytest.fixture
def sharded(llama, tmp_path) -> Path:
    """The tiny Llama saved again in four shards with an index, in its own folder."""
    folder = tmp_path / "sharded"
    llama["eager"].save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def test_07_index_naming_a_missing_shard(llama, sharded):
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(content))
    assert_refused(sharded, llama, r"model\.safetensors\.index\.json names shard "
                                   r"'model-00009-of-00009\.safetensors', which does not exist")


def test_08_same_key_in_two_shards(llama, sharded):
    index = sharded / "model.safetensors.index.json"
    index.unlink()  # a plain folder of shards: every file is read, so the duplicate is seen
    state = vramfx.load_state_dict(llama["folder"])
    safetensors.torch.save_file({"norm.weight": state["norm.weight"]}, sharded / "extra.safetensors")
    assert_refused(sharded, llama, r"tensor 'norm\.weight' is in two files: (?=.*extra\.safetensors)(?=.*model-00004-of-00004\.safetensors)")


# ---------------------------------------------------------------------------------------------
# Weights that do not match the model (cases 9-11)


def test_09_meta_parameter_with_no_weight(llama, tmp_path):
    state = {k: v for k, v in vramfx.load_state_dict(llama["folder"]).items() if k != "norm.weight"}
    safetensors.torch.save_file(state, tmp_path / FILE)
    with nothing_left_behind(), vramfx.DiskMap(tmp_path / FILE) as weights:
        with pytest.raises(vramfx.WeightsError, match=r"1 meta parameter\(s\) have no weight \(not found in the "
                                                      r"weights\): norm\.weight\. Pass weights=DiskMap"):
            compile_from(weights, llama)
        assert weights["embed_tokens.weight"].shape == (128, 64), "the DiskMap is still usable"
    with pytest.raises(vramfx.WeightsError, match=r"have no weight \(no weights were given\): embed_tokens\.weight"):
        compile_from(None, llama)


def test_10_weight_whose_shape_or_dtype_differs_from_the_model(llama, tmp_path):
    state = vramfx.load_state_dict(llama["folder"])
    state["norm.weight"] = torch.ones(32)
    state["layers.0.input_layernorm.weight"] = state["layers.0.input_layernorm.weight"].to(torch.bfloat16)
    safetensors.torch.save_file(state, tmp_path / FILE)
    with nothing_left_behind(), vramfx.DiskMap(tmp_path / FILE) as weights:
        with pytest.raises(vramfx.WeightsError) as info:
            compile_from(weights, llama)
        assert weights["norm.weight"].shape == (32,), "the DiskMap is still usable"
    message = str(info.value)
    assert "2 weight(s) differ from the model" in message
    assert "norm.weight: stored (32,) float32, model expects (64,) float32" in message
    assert "layers.0.input_layernorm.weight: stored (64,) bfloat16, model expects (64,) float32" in message
    assert "Build the model with the checkpoint's config and dtype" in message


#: Set by unpickling :class:`Payload`: proves that a refused pickle ran no code.
UNPICKLED: list[str] = []


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (UNPICKLED.append, ("code from the file ran",))


def test_11_pickle_that_is_not_weights_only(llama, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"norm.weight": torch.ones(64), "trap": Payload()}, path)
    with nothing_left_behind():
        with pytest.raises(vramfx.WeightsError, match=r"(?s)pytorch_model\.bin is not a weights-only pickle, so vramfx "
                                                      r"will not unpickle it.*convert it once to safetensors"):
            vramfx.load_state_dict(path)
        with pytest.raises(vramfx.WeightsError, match=r"pytorch_model\.bin is a pickle checkpoint; DiskMap "
                                                      r"streams safetensors only"):
            compile_from(path, llama)
    assert UNPICKLED == []


# ---------------------------------------------------------------------------------------------
# Files that change, budgets (cases 12-14)


def test_12_weights_file_modified_after_compile(llama, tmp_path):
    path = copy_file(llama, tmp_path)
    with nothing_left_behind(), vramfx.DiskMap(path) as weights:
        fast = streaming(llama, weights)
        stat = path.stat()
        with open(path, "ab") as f:
            f.write(b"\0" * 8)
        with pytest.raises(vramfx.WeightsError, match=r"model\.safetensors changed since it was opened \(size "
                                                      r"\d+ -> \d+ bytes.*reopen the DiskMap \(and recompile\)"):
            fast(**llama["inputs"])
        with pytest.raises(vramfx.WeightsError, match="changed since it was opened"):
            weights["norm.weight"]
        # Put the file back as it was: the DiskMap and the compiled model work again.
        os.truncate(path, stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert torch.equal(weights["norm.weight"], llama["eager"].norm.weight.detach())
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


def test_13_budget_below_the_minimum(llama):
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        with pytest.raises(vramfx.BudgetError, match=r"budget 1 B .* below the minimum of .*pass budget >= ") as info:
            compile_from(weights, llama, budget=1)
        minimum = info.value.minimum_bytes
        with pytest.raises(vramfx.BudgetError) as again:
            compile_from(weights, llama, budget=minimum - 1)
        assert again.value.minimum_bytes == minimum
        # Planned lazily, the first call raises the same error and leaves nothing cached.
        lazy = vramfx.compile(build_empty(LLAMA), budget=minimum - 1, weights=weights, device="cpu")
        with pytest.raises(vramfx.BudgetError):
            lazy(**llama["inputs"])
        assert lazy.compiled_graphs == ()
        fast = compile_from(weights, llama, budget=minimum)
        assert fast.plan.peak_bytes <= minimum
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("8 gigs", r"budget='8 gigs' is not understood; expected an int number of bytes"),
        ("8Gb", r"budget='8Gb': a lower-case 'b' means bits; write 8GB for bytes"),
        ("-1GB", r"budget='-1GB' is not understood"),
        ("0MB", r"budget='0MB'"),
        ("150%", r"budget='150%': a percentage must be in \(0%, 100%\]"),
        (True, r"budget=True is a bool"),
        (1.5e9, r"budget=1500000000\.0 has type float"),
        (None, r"budget=None has type NoneType"),
    ],
)
def test_14_invalid_budget(llama, budget, match):
    with nothing_left_behind():
        with pytest.raises(ValueError, match=match):
            vramfx.compile(build_empty(LLAMA), budget=budget, weights=llama["folder"], device="cpu")


# ---------------------------------------------------------------------------------------------
# Calls (cases 15-18)


def test_15_call_with_a_different_input_structure(llama):
    eager, ids = llama["eager"], llama["inputs"]["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pair = torch.cat([ids, ids.flip(1)])
    calls: list[dict[str, Any]] = [
        {"input_ids": ids, "use_cache": False},
        {"use_cache": False, "input_ids": ids},  # keyword order is not part of the signature
        {"input_ids": ids, "attention_mask": mask, "use_cache": False},  # one more input
        {"input_ids": pair, "use_cache": False},  # another shape
        {"input_ids": ids, "use_cache": False, "return_dict": False},  # another output structure
        {"input_ids": ids, "use_cache": False},  # the first again: its graph is reused
    ]
    # Each further graph holds host memory of its own, which the budget must hold too.
    budget = llama["budget"] + sum(further_graph_bytes(build_empty(LLAMA), kwargs) for kwargs in calls[2:5])
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = vramfx.compile(build_empty(LLAMA), budget=budget, weights=weights, device="cpu")
        graphs = []
        for kwargs in calls:
            with torch.no_grad():
                expected = eager(**kwargs)
            got = fast(**kwargs)
            assert type(got) is type(expected)
            assert torch.equal(expected[0], got[0])
            graphs.append(len(fast.compiled_graphs))
        assert graphs == [1, 1, 2, 3, 4, 4]
        assert fast.plan.streamed_bytes > 0
        fast.release()


def test_16_inputs_on_another_device(llama):
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = streaming(llama, weights)
        wrong = {**llama["inputs"], "input_ids": llama["inputs"]["input_ids"].to("meta")}
        with pytest.raises(ValueError, match=r"an input tensor of shape \(1, 8\) is on meta, but the model was "
                                             r"compiled for cpu; move inputs with \.to\('cpu'\)"):
            fast(**wrong)
        nested = {**llama["inputs"], "attention_mask": torch.ones(1, 8, device="meta")}
        with pytest.raises(ValueError, match=r"is on meta, but the model was compiled for cpu"):
            fast(**nested)
        assert len(fast.compiled_graphs) == 1, "a refused call captures nothing"
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


def test_17_exception_midway_through_a_call_then_the_next_call_succeeds(llama):
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = streaming(llama, weights)
        bad_ids = llama["inputs"]["input_ids"].clone()
        bad_ids[0, 3] = 10_000  # not in the vocabulary: the embedding lookup fails at run time
        with pytest.raises(IndexError, match="index out of range") as info:
            fast(input_ids=bad_ids, use_cache=False)
        assert any("raised by compiled graph node" in note and "embedding" in note for note in info.value.__notes__)
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


def test_17_interrupt_midway_through_a_call_then_the_next_call_succeeds(llama, monkeypatch):
    # Ctrl-C lands between two steps with copies in flight; the next call must start clean.
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = streaming(llama, weights)
        engine = fast.compiled_graphs[0].engine
        real_wait = engine.wait
        waits = {"n": 0}

        def interrupted(transfer: int):
            waits["n"] += 1
            if waits["n"] == len(fast.plan.transfers) // 2 + 1:
                raise KeyboardInterrupt
            return real_wait(transfer)

        monkeypatch.setattr(engine, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fast(**llama["inputs"])
        monkeypatch.undo()
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


def call_or_hang(fn: Callable[[], Any], seconds: float = 120.0) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised, or None; fails if it has not returned in time.

    Not a timing assertion: the limit is far above any real call and only turns a hang into a
    failure instead of a stuck test run.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="call-or-hang")
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call hung for {seconds} s"
    return outcome[0]


@pytest.mark.parametrize(
    ("error", "expected", "match"),
    [
        (OSError(5, "Input/output error (injected)"), vramfx.WeightsError,
         r"reading weights .* failed: \[Errno 5\] Input/output error \(injected\)"),
        (ValueError("not an I/O error (injected)"), ValueError, r"not an I/O error \(injected\)"),
    ],
    ids=["io_error", "other_error"],
)
def test_18_reader_thread_that_fails(llama, monkeypatch, error, expected, match):
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = streaming(llama, weights)
        real_read = vramfx.DiskMap.read_into
        reads = {"n": 0}

        def failing_read(self, key, out, **kwargs):
            reads["n"] += 1
            if reads["n"] in (2, 3):  # the reader thread fails twice in one call
                raise error
            return real_read(self, key, out, **kwargs)

        monkeypatch.setattr(vramfx.DiskMap, "read_into", failing_read)
        raised = call_or_hang(lambda: fast(**llama["inputs"]))
        assert isinstance(raised, expected)
        assert re.search(match, str(raised)), raised
        assert any("raised by compiled graph node" in note and "wait" in note for note in raised.__notes__)
        assert call_or_hang(lambda: fast(**llama["inputs"])) is None, "the next call works (reads now succeed)"
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


def test_18_reader_that_fails_loading_resident_weights(llama, monkeypatch):
    with nothing_left_behind(), vramfx.DiskMap(llama["folder"]) as weights:
        fast = compile_from(weights, llama)
        assert fast.plan.resident and fast.plan.streamed_bytes > 0
        real_read = vramfx.DiskMap.read_into

        def failing_read(self, key, out, **kwargs):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(vramfx.DiskMap, "read_into", failing_read)
        with pytest.raises(vramfx.WeightsError, match=r"reading resident weight .* failed: .*\(injected\)"):
            fast(**llama["inputs"])
        assert not fast.compiled_graphs[0].engine.active, "the half-activated engine holds no arena"
        monkeypatch.setattr(vramfx.DiskMap, "read_into", real_read)
        assert torch.equal(llama["expected"], fast(**llama["inputs"]).last_hidden_state)
        fast.release()


# ---------------------------------------------------------------------------------------------
# Strange files (cases 19-23): refused without blocking, or read so they cannot change later


@contextlib.contextmanager
def unblocking(fifo: Path) -> Iterator[None]:
    """Should a reader block opening ``fifo`` (the bug), open it for writing after the block,
    so the stuck thread returns and the run can go on."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_19_a_fifo_named_like_weights(llama, tmp_path):
    fifo = tmp_path / FILE
    os.mkfifo(fifo)
    pickle_fifo = tmp_path / "other" / "pytorch_model.bin"
    pickle_fifo.parent.mkdir()
    os.mkfifo(pickle_fifo)
    with unblocking(fifo), unblocking(pickle_fifo), nothing_left_behind():
        for source in (tmp_path, fifo):
            for load in (vramfx.DiskMap, vramfx.load_state_dict, lambda s: compile_from(s, llama)):
                raised = call_or_hang(lambda: load(source), seconds=30)
                assert isinstance(raised, vramfx.WeightsError), raised
                assert re.search(r"model\.safetensors is a FIFO, not a regular file", str(raised)), raised
        raised = call_or_hang(lambda: vramfx.load_state_dict(pickle_fifo), seconds=30)
        assert isinstance(raised, vramfx.WeightsError) and "pytorch_model.bin is a FIFO" in str(raised), raised


def test_20_a_directory_named_like_a_shard(llama, tmp_path):
    shutil.copyfile(llama["folder"] / FILE, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").mkdir()
    assert_refused(tmp_path, llama, r"b\.safetensors is a directory, not a regular file")


@pytest.mark.parametrize(
    ("value", "match"),
    [("[" * 100_000 + "]" * 100_000, r"header JSON is nested too deeply"),
     ("1" * 5000, r"header is not valid UTF-8 JSON \(.*integer"),
     ('["F32"]', r"tensor '.*' has unknown dtype \['F32'\]")],
    ids=["deeply_nested", "5000_digit_integer", "dtype_not_a_string"],
)
def test_21_a_header_that_is_json_but_not_a_header(llama, tmp_path, value, match):
    path = copy_file(llama, tmp_path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + length].decode()
    key = "norm.weight" if "unknown dtype" in match else "__metadata__"
    if key == "norm.weight":
        text = header.replace('"dtype":"F32"', f'"dtype":{value}', 1)
    else:
        text = '{"__metadata__":{"x":' + value + "}," + header[1:]
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + length :])
    assert_refused(path, llama, r"model\.safetensors: " + match)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/tmp/outside.safetensors"])
def test_22_an_index_naming_a_shard_outside_its_folder(llama, sharded, escape):
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    shard = content["weight_map"]["norm.weight"]
    shutil.copyfile(sharded / shard, sharded.parent / "outside.safetensors")
    content["weight_map"] = {k: escape if v == shard else v for k, v in content["weight_map"].items()}
    index.write_text(json.dumps(content))
    assert_refused(sharded, llama, r"names shard '.*outside\.safetensors', which is not a file in the index's folder")


def test_22_an_index_whose_shards_are_symbolic_links_as_in_the_hub_cache(llama, sharded, tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(sharded.iterdir())):
        shutil.copyfile(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(blobs / f"blob{i}")
    with nothing_left_behind(), vramfx.DiskMap(snapshot) as weights:
        assert torch.equal(llama["expected"], streaming(llama, weights)(**llama["inputs"]).last_hidden_state)


def test_23_a_pickle_checkpoint_rewritten_or_truncated_after_loading(llama, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    state = vramfx.load_state_dict(llama["folder"])
    torch.save(state, path)
    # In a child process: when the checkpoint was memory-mapped, truncating it killed the
    # process reading a tensor (SIGBUS).
    script = f"""
import os, torch, vramfx
path = {str(path)!r}
loaded = vramfx.load_state_dict(path)
before = {{k: v.clone() for k, v in loaded.items()}}
torch.save({{k: torch.zeros_like(v) for k, v in loaded.items()}}, path + ".new")
with open(path + ".new", "rb") as src, open(path, "r+b") as dst:  # rewritten in place
    dst.write(src.read())
assert all(torch.equal(before[k], v) for k, v in loaded.items()), "outputs changed with the file"
os.truncate(path, 64)
assert all(torch.equal(before[k], v) for k, v in loaded.items())
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
