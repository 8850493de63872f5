"""The persistent capture cache: an entry read back equals a fresh capture, its key changes with
everything the graph depends on, and bad entries, switches and concurrent writers are handled."""

from __future__ import annotations

import threading

import pytest
import torch

import vramfx
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved
from vramfx import capture_cache
from vramfx.capture import capture
from vramfx.capture_cache import cache_dir, cached_capture, capture_key
from vramfx.plan.liveness import build_liveness

CPU = torch.device("cpu")


def _entries(folder):
    return sorted((folder / "captures").glob("*.pkl")) if (folder / "captures").exists() else []


def _no_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.export ran although the capture was cached")

    monkeypatch.setattr(torch.export, "export", refuse)


def _describe_val(val):
    if isinstance(val, torch.Tensor):
        return ("t", tuple(val.shape), val.stride(), val.storage_offset(), val.dtype, val.untyped_storage().nbytes())
    if isinstance(val, (list, tuple)):
        return tuple(_describe_val(v) for v in val)
    return val


def _describe_arg(arg):
    return torch.fx.node.map_aggregate(arg, lambda a: ("node", a.name) if isinstance(a, torch.fx.Node) else a)


def _storage_groups(captured):
    """Which node values share storage, as groups of node names."""
    groups = {}
    for node in captured.graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            groups.setdefault(val.untyped_storage()._cdata, []).append(node.name)
    return sorted(tuple(g) for g in groups.values())


def assert_same_capture(expected, actual):
    exp_nodes, act_nodes = list(expected.graph_module.graph.nodes), list(actual.graph_module.graph.nodes)
    assert [n.name for n in exp_nodes] == [n.name for n in act_nodes]
    for e, a in zip(exp_nodes, act_nodes):
        assert (e.op, e.target) == (a.op, a.target), e.format_node()
        assert _describe_arg(e.args) == _describe_arg(a.args), e.format_node()
        assert _describe_arg(e.kwargs) == _describe_arg(a.kwargs), e.format_node()
        assert _describe_val(e.meta.get("val")) == _describe_val(a.meta.get("val")), e.format_node()
        assert e.meta.get("stack_trace") == a.meta.get("stack_trace")
        assert e.meta.get("nn_module_stack") == a.meta.get("nn_module_stack")
    assert _storage_groups(expected) == _storage_groups(actual)
    assert expected.in_spec == actual.in_spec and expected.out_spec == actual.out_spec
    assert (expected.device, expected.input_objects) == (actual.device, actual.input_objects)
    assert len(expected.weights) == len(actual.weights)
    for e, a in zip(expected.weights, actual.weights):
        assert (e.name, e.placeholders, e.kind, e.shape, e.dtype, e.persistent, e.aliases, e.requires_grad) == (
            a.name, a.placeholders, a.kind, a.shape, a.dtype, a.persistent, a.aliases, a.requires_grad)
        assert (e.value is None) == (a.value is None)
        if e.value is not None:
            assert torch.equal(e.value, a.value) and e.value.dtype == a.value.dtype


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_cached_capture_equals_a_fresh_one(arch_name, capture_cache_dir, monkeypatch):
    arch = ARCHS[arch_name]
    model, inputs = build_empty(arch), arch.inputs()
    fresh = capture(model, (), inputs)
    first = cached_capture(model, (), inputs)
    assert len(_entries(capture_cache_dir)) == 1
    _no_export(monkeypatch)
    again = cached_capture(model, (), inputs)
    assert_same_capture(fresh, first)
    assert_same_capture(fresh, again)
    assert build_liveness(fresh) == build_liveness(again)
    assert again.graph_module.code == fresh.graph_module.code


def test_a_second_compile_reads_the_cache_and_equals_eager(tmp_path, capture_cache_dir, monkeypatch):
    arch = ARCHS["llama"]
    eager = build_saved(arch, tmp_path)
    inputs = arch.inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    weights = vramfx.DiskMap(tmp_path)
    budget = sum(t.numel() * t.element_size() for t in eager.state_dict().values()) + 2**26
    first = vramfx.compile(build_empty(arch), budget=budget, weights=weights, device="cpu", example_kwargs=inputs)
    _no_export(monkeypatch)
    second = vramfx.compile(build_empty(arch), budget=budget, weights=weights, device="cpu", example_kwargs=inputs)
    assert_same_output(expected, first(**inputs))
    assert_same_output(expected, second(**inputs))
    assert second.plan == first.plan


def test_real_parameters_are_bound_from_the_model_not_the_entry(capture_cache_dir):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    x = torch.ones(1, 4)
    cached_capture(model, (x,))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    again = cached_capture(model, (x,))
    assert again.name_to_weight["0.weight"].value.data_ptr() == model[0].weight.data_ptr()


def _key(model, *args, dtype=None):
    return capture_key(model, args, {}, CPU, dtype)


def test_the_key_changes_with_what_the_graph_depends_on():
    torch.manual_seed(0)

    def mlp(hidden=8, act=torch.nn.ReLU):
        with vramfx.skip_model_initialization():
            return torch.nn.Sequential(torch.nn.Linear(4, hidden), act(), torch.nn.Linear(hidden, 2)).eval()

    x = torch.ones(3, 4)
    base = _key(mlp(), x)
    assert base == _key(mlp(), x)  # a new instance of the same model and call
    assert base != _key(mlp(hidden=16), x)  # shapes
    assert base != _key(mlp(act=torch.nn.GELU), x)  # module class
    assert base != _key(mlp(), torch.ones(5, 4))  # input shape
    assert base != _key(mlp(), x.double())  # input dtype
    assert base != _key(mlp(), x, dtype=torch.bfloat16)  # compute dtype
    assert base != capture_key(mlp(), (x,), {}, torch.device("meta"), None)  # device
    half = mlp()
    half[0].weight = torch.nn.Parameter(torch.empty(8, 4, dtype=torch.float16, device="meta"))
    assert base != _key(half, x)  # a weight's dtype
    tied = mlp(hidden=4)
    tied[2] = torch.nn.Linear(4, 4)
    tied_again = mlp(hidden=4)
    tied_again[2] = torch.nn.Linear(4, 4)
    tied_again[2].weight = tied_again[0].weight
    assert _key(tied, x) != _key(tied_again, x)  # ties
    act = mlp(act=torch.nn.LeakyReLU)
    act[1].negative_slope = 0.2
    assert _key(mlp(act=torch.nn.LeakyReLU), x) != _key(act, x)  # a module's plain attribute
    trained = mlp()
    trained.train()
    assert base != _key(trained, x)  # mode


def test_the_key_follows_a_transformers_config():
    from transformers import LlamaConfig, LlamaModel

    def llama(**changes):
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, **changes)
        with vramfx.skip_model_initialization():
            return LlamaModel(config).eval()

    ids = torch.zeros(1, 8, dtype=torch.long)
    key = capture_key(llama(), (), {"input_ids": ids, "use_cache": False}, CPU, None)
    assert key == capture_key(llama(), (), {"input_ids": ids, "use_cache": False}, CPU, None)
    assert key != capture_key(llama(rope_theta=500.0), (), {"input_ids": ids, "use_cache": False}, CPU, None)
    assert key != capture_key(llama(rms_norm_eps=1e-5), (), {"input_ids": ids, "use_cache": False}, CPU, None)
    assert key != capture_key(llama(), (), {"input_ids": ids, "use_cache": True}, CPU, None)


def test_hooks_and_instance_forwards_are_not_cached(capture_cache_dir):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    x = torch.ones(1, 4)
    handle = model[0].register_forward_hook(lambda m, i, o: o * 2)
    assert capture_key(model, (x,), {}, CPU, None) is None
    cached_capture(model, (x,))
    assert _entries(capture_cache_dir) == []
    handle.remove()
    model[0].forward = lambda t: t
    assert capture_key(model, (x,), {}, CPU, None) is None


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_the_cache_can_be_turned_off(switch, capture_cache_dir, monkeypatch):
    model = torch.nn.Linear(4, 4).eval()
    if switch == "env":
        monkeypatch.setenv("VRAMFX_CACHE", "0")
        cached_capture(model, (torch.ones(1, 4),))
        fast = vramfx.compile(model, budget="16MiB", device="cpu", example_args=(torch.ones(1, 4),))
    else:
        cached_capture(model, (torch.ones(1, 4),), cache=False)
        fast = vramfx.compile(model, budget="16MiB", device="cpu", example_args=(torch.ones(1, 4),), cache=False)
    assert _entries(capture_cache_dir) == []
    assert torch.equal(fast(torch.ones(1, 4)), model(torch.ones(1, 4)))


def test_compile_checks_the_cache_argument():
    with pytest.raises(TypeError, match="cache"):
        vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", cache="yes")


def test_the_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMFX_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VRAMFX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vramfx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vramfx"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other key"])
def test_a_bad_entry_is_ignored_and_replaced(damage, capture_cache_dir, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.ones(1, 4)
    fresh = cached_capture(model, (x,))
    (entry,) = _entries(capture_cache_dir)
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a whole entry of another call under this name
        cached_capture(model, (torch.ones(2, 4),))
        (other,) = [e for e in _entries(capture_cache_dir) if e != entry]
        entry.write_bytes(other.read_bytes())
    with caplog.at_level("DEBUG", logger="vramfx.capture_cache"):
        again = cached_capture(model, (x,))
    assert "ignoring unreadable capture cache entry" in caplog.text
    assert_same_capture(fresh, again)
    assert entry.read_bytes() == data  # replaced by a good one


def test_concurrent_writers_leave_one_whole_entry(capture_cache_dir, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.ones(1, 4)
    captured = capture(model, (x,))
    key = capture_key(model, (x,), {}, CPU, None)
    path = capture_cache_dir / "captures" / f"{key}.pkl"
    threads = [threading.Thread(target=capture_cache._store, args=(path, key, captured, model)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in (capture_cache_dir / "captures").iterdir()] == [path.name]  # no temporaries left
    _no_export(monkeypatch)
    assert_same_capture(captured, cached_capture(model, (x,)))


def test_an_unwritable_cache_costs_only_the_entry(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VRAMFX_CACHE_DIR", str(blocker))
    model = torch.nn.Linear(4, 4).eval()
    fast = vramfx.compile(model, budget="16MiB", device="cpu", example_args=(torch.ones(1, 4),))
    assert torch.equal(fast(torch.ones(1, 4)), model(torch.ones(1, 4)))
