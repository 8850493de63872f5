"""Plans for people: the replayed timeline, layers, the table, the Chrome trace, the memory plot."""

from __future__ import annotations

import io
import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import UNIT_COSTS, liveness, livenesses, stored_low, weight

from vramfx.plan.schedule import minimum_budget, schedule
from vramfx.report.layers import TOP_LEVEL, layer_labels, schedule_blocks, weight_layers
from vramfx.report.plot import MissingMatplotlib, plot_memory, require_matplotlib
from vramfx.report.progress import Progress
from vramfx.report.table import format_table
from vramfx.report.timeline import memory_profile, predict_timeline
from vramfx.report.trace import chrome_trace


def _two_block_plan(extra: int = 0):
    """Six positions in two blocks of three, one 1000-byte weight per position, streamed."""
    names = ["embed.weight"] + [f"blocks.{b}.{m}.weight" for b in range(2) for m in ("q", "k")] + ["head.weight"]
    lv = liveness(6, [weight(n, 1000, t) for t, n in enumerate(names)], activations=[10, 20, 30, 20, 10, 5],
                  flops=[2e6] * 6)
    budget = minimum_budget(lv, alignment=64) + extra
    return lv, schedule(lv, budget, cost_model=UNIT_COSTS, calls=1, alignment=64)


@given(livenesses(), st.floats(0.0, 1.5), st.sampled_from([1, 10]))
def test_timeline_replays_the_schedulers_prediction(lv, fraction, calls):
    budget = minimum_budget(lv, alignment=64) + int(fraction * lv.weight_bytes)
    plan = schedule(lv, budget, cost_model=UNIT_COSTS, calls=calls, alignment=64)
    timeline = predict_timeline(plan, lv)

    assert timeline.seconds == pytest.approx(plan.predicted.seconds_per_call, rel=1e-9, abs=1e-15)
    assert sum(timeline.stall_seconds) + timeline.interference_seconds == pytest.approx(
        plan.predicted.stall_seconds, rel=1e-9, abs=1e-15)
    assert sum(timeline.node_seconds) == pytest.approx(plan.predicted.compute_seconds, rel=1e-9, abs=1e-15)
    end = 0.0
    for t in range(lv.num_positions):  # nodes run one after another, stalls before them
        assert timeline.node_start[t] >= end + timeline.stall_seconds[t] - 1e-12
        end = timeline.node_start[t] + timeline.node_seconds[t]
    engine_free = 0.0
    for i, tr in enumerate(plan.transfers):  # one copy engine, in plan order, after the fetch
        assert timeline.copy_start[i] >= engine_free - 1e-12
        issued = timeline.node_start[tr.fetch] - timeline.stall_seconds[tr.fetch]  # compute reached it
        assert timeline.copy_start[i] >= issued - 1e-12
        engine_free = timeline.copy_start[i] + timeline.copy_seconds[i]
        assert engine_free <= timeline.node_start[tr.wait] + 1e-12, "a weight is read before it arrives"

    memory = memory_profile(plan, lv)
    assert all(0 <= s <= plan.arena_bytes for s in memory.streamed)
    for t in range(lv.num_positions):
        held = sum(tr.nbytes for tr in plan.transfers if tr.fetch <= t < tr.drop)
        assert memory.streamed[t] == held
    assert max((memory.in_use(t) for t in range(lv.num_positions)), default=plan.peak_bytes) == plan.peak_bytes


def test_timeline_refuses_a_liveness_of_another_graph():
    lv, plan = _two_block_plan()
    other = liveness(3, [weight("w", 10, 0)])
    with pytest.raises(ValueError, match="pass the liveness the plan was made from"):
        predict_timeline(plan, other)


@pytest.mark.parametrize(
    "paths, expected",
    [
        # A causal LM: the wrapper ``model`` and the root run between layers.
        (["", "model.embed_tokens", "model", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp", "",
          "model.layers.1", "model.norm", "lm_head"],
         ["model.embed_tokens"] * 3 + ["model.layers.0"] * 3 + ["model.layers.1", "model.norm", "lm_head"]),
        # A DiT: blocks at the top level; other modules cut to their top-level name.
        (["rope", "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder", "blocks.0.attn1",
          "blocks.0", "blocks.1.ffn.net.0", "", "norm_out", "proj_out"],
         ["rope", "condition_embedder", "condition_embedder", "blocks.0", "blocks.0", "blocks.1", "blocks.1",
          "norm_out", "proj_out"]),
        # A UNet: numbered blocks nested inside numbered blocks keep the outer number.
        (["conv_in", "down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.resnets.0", "up_blocks.1"],
         ["conv_in", "down_blocks.0", "mid_block.resnets.0", "up_blocks.1"]),
        (["", ""], [TOP_LEVEL, TOP_LEVEL]),
    ],
)
def test_layer_labels(paths, expected):
    assert layer_labels(paths) == tuple(expected)


def test_weight_layers():
    names = ["model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight", "lm_head.weight", "scale_shift_table"]
    assert weight_layers(names) == {
        "model.embed_tokens.weight": "model.embed_tokens",
        "model.layers.3.mlp.up_proj.weight": "model.layers.3",
        "lm_head.weight": "lm_head",
        "scale_shift_table": "scale_shift_table",
    }


@given(livenesses(), st.floats(0.0, 1.0), st.lists(st.sampled_from(["a", "b", ""]), min_size=40, max_size=40))
def test_blocks_cover_every_position_and_step_once(lv, fraction, names):
    plan = schedule(lv, minimum_budget(lv) + int(fraction * lv.weight_bytes), cost_model=UNIT_COSTS)
    blocks = schedule_blocks(plan, layer_labels(names[: lv.num_positions]))
    assert [p for b in blocks for p in range(b.begin, b.end)] == list(range(lv.num_positions))
    assert all(a.layer != b.layer for a, b in zip(blocks, blocks[1:])), "neighbouring blocks of one layer merge"
    for op in ("fetch", "wait", "drop"):
        indices = sorted(i for b in blocks for i in getattr(b, op))
        assert indices == list(range(len(plan.transfers)))
        for b in blocks[:-1]:
            assert all(b.begin <= getattr(plan.transfers[i], op) < b.end for i in getattr(b, op))


def test_table_has_one_line_per_block_and_the_totals():
    lv, plan = _two_block_plan()
    labels = layer_labels(["embed", "blocks.0.q", "blocks.0.k", "blocks.1.q", "blocks.1.k", "head"])
    text = format_table(plan, lv, labels, settings=[("budget", "given"), ("device", "cpu")])
    lines = text.splitlines()
    assert lines[0].startswith("budget") and lines[1].startswith("device")
    assert plan.summary() in text
    rows = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in
            ("embed", "blocks.0", "blocks.1", "head", "total")]
    assert rows == ["embed", "blocks.0", "blocks.1", "head", "total"]
    total = next(line for line in lines if line.startswith("  total"))
    assert f"in {len(plan.transfers)}" in total  # every transfer is counted once


def test_chrome_trace_tracks_and_counters():
    lv, plan = _two_block_plan()
    labels = layer_labels(["embed", "blocks.0.q", "blocks.0.k", "blocks.1.q", "blocks.1.k", "head"])
    trace = json.loads(json.dumps(chrome_trace(plan, lv, labels, title="two blocks")))
    events = trace["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    nodes = [e for e in slices if e["cat"] == "node"]
    layers = [e for e in slices if e["cat"] == "layer"]
    copies = [e for e in slices if e["cat"] == "copy"]
    assert [e["name"] for e in nodes] == list(plan.position_names)
    assert [e["name"] for e in layers] == ["embed", "blocks.0", "blocks.1", "head"]
    assert len(copies) == len(plan.transfers) > 0
    for node in nodes:  # each node nests inside its layer's slice
        layer = next(e for e in layers if e["name"] == node["args"]["layer"])
        assert layer["ts"] - 1e-6 <= node["ts"] and node["ts"] + node["dur"] <= layer["ts"] + layer["dur"] + 1e-6
    end = max(e["ts"] + e["dur"] for e in slices if e["tid"] == 1)
    assert end == pytest.approx(plan.predicted.seconds_per_call * 1e6, rel=1e-9)
    memory = [e for e in events if e["ph"] == "C" and e["name"] == "device memory (MiB)"]
    assert memory and max(sum(e["args"].values()) for e in memory) == pytest.approx(plan.peak_bytes / 2**20)
    assert {e["name"] for e in events if e["ph"] == "C"} == {"device memory (MiB)", "budget (MiB)"}


def test_memory_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    lv, plan = _two_block_plan(extra=1500)
    path = tmp_path / "memory.png"
    plot_memory(plan, lv, layer_labels(["embed"] + ["blocks.0"] * 2 + ["blocks.1"] * 2 + ["head"]), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(MissingMatplotlib, match=r"pip install 'vramfx\[plot\]'"):
        require_matplotlib()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only():
    piped = io.StringIO()
    with Progress(stream=piped).stage("capturing"):
        pass
    assert piped.getvalue() == ""
    pytest.importorskip("rich")
    terminal = _Terminal()
    with Progress(stream=terminal).stage("capturing"):
        pass
    assert "capturing" in terminal.getvalue()


def test_the_upcast_region_is_part_of_memory_in_the_profile_table_and_trace():
    lv, _ = _two_block_plan()
    low = stored_low(lv, {"blocks.0.q.weight", "blocks.1.k.weight"})
    plan = schedule(low, minimum_budget(low, alignment=64) + 2000, cost_model=UNIT_COSTS, calls=10, alignment=64)
    memory = memory_profile(plan, low)
    assert memory.upcast == plan.upcast_bytes > 0
    assert max(memory.in_use(t) for t in range(low.num_positions)) == plan.peak_bytes
    counters = [e for e in chrome_trace(plan, low, ["x"] * low.num_positions)["traceEvents"]
                if e.get("name") == "device memory (MiB)"]
    assert counters and all(e["args"]["upcast region"] == plan.upcast_bytes / 2**20 for e in counters)
    table = format_table(plan, low, layer_labels(["blocks.0"] * 3 + ["blocks.1"] * 3))
    header = next(line for line in table.splitlines() if line.lstrip().startswith("layer"))
    assert "upcasts" in table and header.split()[-1] == "cast"
    assert table.splitlines()[-1].split()[-1] == str(len(plan.casts))
