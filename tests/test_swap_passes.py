"""Passes found from module calls: a model driven without its forward gets residency and prefetch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vramfx
from vramfx.swap import AutoWrappedLinear, enable_vram_management, offload, swap_stats
from vramfx.swap.passes import PassFinder, items_of, period, record_of
from vramfx.swap.record import CallRecord

WIDTH, DEPTH = 32, 6
UNIT_BYTES = WIDTH * WIDTH * 4 + WIDTH * 4
LIMIT = f"{3 * UNIT_BYTES}B"  # room for three layers: some kept, the others streamed
X = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))


class Layers(torch.nn.Module):
    """Linear layers that a pipeline function drives (its forward does the same)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))

    def forward(self, x):
        return model_fn(self, x)


def model_fn(model: Layers, x: torch.Tensor, order=range(DEPTH)) -> torch.Tensor:
    """What a pipeline's model function does: call the model's modules, never its forward."""
    for i in order:
        x = torch.tanh(model.layers[i](x))
    return x


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    eager = Layers().eval()
    path = tmp_path_factory.mktemp("layers") / "model.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path


def managed(path, limit=LIMIT, **kwargs) -> Layers:
    with vramfx.skip_model_initialization():
        model = Layers().eval()
    return enable_vram_management(model, {torch.nn.Linear: AutoWrappedLinear},
                                  dict(offload_device="disk", computation_device="cpu"), vram_limit=limit,
                                  disk_map=vramfx.DiskMap(path), **kwargs)


def names(order) -> tuple[str, ...]:
    return tuple(f"layers.{i}" for i in order)


# -- the pure part: streams of items -------------------------------------------------------------
A, B, C, D = (((u, 1),) for u in range(4))


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        ([A, B, A, B], (0, 2)),  # a pass seen twice
        ([A, B, C], None),  # once is not enough
        ([A, B, A, C, A, B, A, C], (0, 4)),  # the first module called twice in each pass
        ([A, B, A, C, A, B], None),
        ([D, A, B, A, B], None),  # after a prefix, two repetitions could be chance ...
        ([D, A, B, A, B, A, B], (1, 2)),  # ... three are not: the prefix never comes back
        ([A, B, B], None),  # a module called twice in a row is not a pass
        ([A, B, B, C, A, B, B, C], (0, 4)),
        ([A, B, A, B, A], None),  # the stream must end where a repetition ends
    ],
)
def test_the_block_a_stream_ends_by_repeating(stream, expected):
    assert period(stream) == expected


def test_items_keep_nesting_and_turn_back_into_the_record():
    record = CallRecord(order=[0, 1, 2, 3, 0], ends=[3, 2, 3, 4, 5], flops=[1.0, 2.0, 3.0, 4.0, 1.0])
    items = items_of(record)
    assert items == [((0, 3), (1, 1), (2, 1)), ((3, 1),), ((0, 1),)]
    again = record_of(items, {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0})
    assert (again.order, again.ends, again.flops) == (record.order, record.ends, record.flops)


def test_the_finder_follows_the_first_pass_until_the_stream_shows_another_twice():
    finder = PassFinder()
    assert finder.pass_ended([A, B], completed=False) == [A, B], "the recording pass is followed at once"
    assert finder.pass_ended([A, B], completed=True) is None and finder.history == [], "confirmed"
    assert finder.pass_ended([A, C], completed=False) is None, "one different pass changes nothing"
    assert finder.pass_ended([A, B], completed=True) is None
    assert finder.pass_ended([A, C], completed=False) is None
    assert finder.pass_ended([A, B], completed=True) == [A, C, A, B], "alternating passes: one longer order"
    assert finder.history == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), min_size=1, max_size=12))
def test_the_history_stays_bounded_and_every_order_came_from_the_stream(passes):
    finder = PassFinder()
    stream: list = []
    for units in passes:
        items = [((u, 1),) for u in units]
        stream += items
        order = finder.pass_ended(items, completed=False)
        if order is not None:
            text = repr(stream)
            assert repr(order)[1:-1] in text, "an order is a block of what was called"
        assert len(finder.history) <= 256 + len(items)


# -- the runtime: a model driven by a function ---------------------------------------------------
def test_a_model_driven_by_a_function_is_planned_and_fetched_ahead(saved):
    eager, path = saved
    model = managed(path)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model_fn(eager, X), model_fn(model, X))
    stats = swap_stats(model)
    assert stats.order == names(range(DEPTH))
    streamed = DEPTH - len(stats.resident)
    assert stats.resident and streamed > 0
    assert stats.prefetched == streamed and stats.synchronous == 0, "every streamed layer was fetched ahead"
    assert stats.held_peak_bytes <= 3 * UNIT_BYTES


def test_the_first_module_called_twice_per_pass_ends_up_in_one_order(saved):
    eager, path = saved
    model = managed(path)
    order = [0, 1, 0, 2, 3, 4, 5]  # layer 0 twice per call
    with torch.no_grad():
        for _ in range(6):
            assert torch.equal(model_fn(eager, X, order), model_fn(model, X, order))
    stats = swap_stats(model)
    assert stats.order == names(order)
    assert stats.synchronous == 0 and stats.prefetched > 0


def test_a_module_called_once_before_the_loop_is_left_out_of_the_order(saved):
    eager, path = saved
    model = managed(path)
    with torch.no_grad():
        model.layers[5](X)  # a one-off use before the pipeline's loop
        for _ in range(5):
            assert torch.equal(model_fn(eager, X, range(5)), model_fn(model, X, range(5)))
    stats = swap_stats(model)
    assert stats.order == names(range(5)) and stats.synchronous == 0


def test_passes_that_alternate_become_one_order(saved):
    eager, path = saved
    model = managed(path)
    full, short = list(range(DEPTH)), [0, 5]  # a cache skips the middle layers every other step
    with torch.no_grad():
        for step in range(8):
            order = full if step % 2 == 0 else short
            assert torch.equal(model_fn(eager, X, order), model_fn(model, X, order))
    assert swap_stats(model).order in (names(full + short), names(short + full))
    assert swap_stats(model).synchronous == 0


def test_a_failure_inside_a_pass_changes_nothing_for_later_ones(saved):
    eager, path = saved
    model = managed(path)
    with torch.no_grad():
        for _ in range(3):
            model_fn(model, X)
        before = swap_stats(model).order
        with pytest.raises(RuntimeError, match="mat1 and mat2"):
            model_fn(model, torch.ones(2, WIDTH + 1))
        for _ in range(2):
            assert torch.equal(model_fn(eager, X), model_fn(model, X))
    stats = swap_stats(model)
    assert stats.order == before and stats.synchronous == 0
    assert all(p.is_meta for p in model.parameters()), "the faces are back in place"


def test_offload_and_a_forward_call_end_a_pass(saved):
    eager, path = saved
    model = managed(path)
    with torch.no_grad():
        model_fn(model, X)
        offload(model)  # a pipeline done with the model: the recording ends here
        assert swap_stats(model).order == names(range(DEPTH))
        assert torch.equal(model_fn(eager, X), model_fn(model, X))
        assert torch.equal(eager(X), model(X)), "a forward call is a call of its own"
        for _ in range(2):
            assert torch.equal(model_fn(eager, X), model_fn(model, X))
    assert swap_stats(model).synchronous == 0


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, DEPTH - 1), min_size=1, max_size=8), min_size=1, max_size=6),
       st.sampled_from([0, UNIT_BYTES, 3 * UNIT_BYTES]))
def test_any_stream_of_module_calls_equals_eager(saved, calls, limit):
    eager, path = saved
    model = managed(path, limit=f"{limit}B" if limit else 0)
    with torch.no_grad():
        for order in calls:
            assert torch.equal(model_fn(eager, X, order), model_fn(model, X, order))
    assert swap_stats(model).held_peak_bytes <= max(limit, UNIT_BYTES)
