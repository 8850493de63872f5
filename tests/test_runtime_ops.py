"""The transfer ops under torch.compile: opaque to dynamo, so a compiled model still equals eager."""

from __future__ import annotations

import pytest
import torch
from fake_streams import ThreadStreams
from test_compiled import Stack, stack_budget
from test_runtime_cuda import use_cuda_engine

import vramfx
from vramfx.runtime import ops


def compiled_stack():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(4, 32)
    # A budget of about one layer beyond the minimum: most weights stream.
    fast = vramfx.compile(model, budget=stack_budget(model, x), device="cpu", margin_bytes=2 * 2**20,
                          example_args=(x,))
    assert fast.plan.transfers
    with torch.no_grad():
        return model(x), fast, x


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_of_a_compiled_model_equals_eager_and_keeps_the_steps_out_of_its_graphs():
    expected, fast, x = compiled_stack()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fast, backend=backend)
    for _ in range(2):
        assert torch.equal(compiled(x), expected)
    assert graphs, "dynamo compiled the model's compute"
    steps = {ops.fetch, ops.wait, ops.drop, ops.resident}
    assert not [n for g in graphs for n in g.graph.nodes if n.target in steps]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_the_rewritten_graph_compiles_and_runs_with_the_cuda_engine(backend):
    expected, fast, x = compiled_stack()
    streams = ThreadStreams(copy_delay_s=0.0005)
    use_cuda_engine(fast, streams, pin_host=False)
    entry = fast.compiled_graphs[0]
    entry.graph_module = torch.compile(entry.graph_module, backend=backend)
    for _ in range(2):
        assert torch.equal(fast(x), expected)
    fast.release()
    streams.close()
