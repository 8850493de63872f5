"""The CUDA engine: its whole ordering logic on host-thread streams, and on a GPU when there is one.

Without a GPU the engine runs with ``fake_streams.ThreadStreams``: the copy stream is a worker
thread whose copies read their source when they run, so a missing wait shows as wrong bytes.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from fake_streams import FakePinner, ThreadStreams
from test_rewrite import planned
from tiny_models import ARCHS, assert_same_output, build_empty, build_saved, streaming_budget

import vramfx
from vramfx.runtime import cuda as cuda_module
from vramfx.runtime.cuda import CudaEngine
from vramfx.runtime.engine import ResidentStore
from vramfx.runtime.pinned import PinnedHostMemory, PinRegistry
from vramfx.weights import resolve_weights

PAGE = 4096


def small_pinned(limit_bytes: int | None = None) -> PinnedHostMemory:
    """Pinning with page-sized chunks, so tiny models get pinned and staged stretches."""
    return PinnedHostMemory(FakePinner(limit_bytes), chunk_bytes=4 * PAGE, min_bytes=PAGE, page_bytes=PAGE,
                            registry=PinRegistry())


def use_cuda_engine(fast, streams, **kwargs) -> list[CudaEngine]:
    """Swap the CPU engine of every captured graph for a CUDA engine on ``streams``."""
    engines = []
    for entry in fast.compiled_graphs:
        entry.engine.deactivate()
        kwargs = {"slot_bytes": 4096, "slots": 3, "readers": 2, **kwargs}
        entry.engine = CudaEngine(entry.plan, entry.engine.refs, torch.device("cpu"), ResidentStore(),
                                  streams=streams, **kwargs)
        engines.append(entry.engine)
    return engines


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize(
    "arch, dtype, storage",
    [("llama", torch.float32, "disk"), ("llama", torch.bfloat16, "host"),
     ("flux", torch.bfloat16, "disk"), ("flux", torch.float16, "host")],
)
def test_real_models_equal_eager_through_the_cuda_engine(tmp_path, arch, dtype, storage):
    torch.manual_seed(0)
    eager = ARCHS[arch].build().eval().to(dtype)
    eager.save_pretrained(tmp_path)
    inputs = cast(ARCHS[arch].inputs(), dtype)
    with torch.no_grad():
        expected = eager(**inputs)
    disk = vramfx.DiskMap(tmp_path)
    weights = disk if storage == "disk" else {k: disk[k] for k in disk}
    empty = build_empty(ARCHS[arch]).to(dtype)
    fast = vramfx.compile(empty, budget=streaming_budget(empty, disk, inputs), weights=weights, device="cpu",
                          example_kwargs=inputs)
    streams = ThreadStreams(copy_delay_s=0.0005)
    pinned = small_pinned()
    (engine,) = use_cuda_engine(fast, streams, pinned=pinned)
    assert fast.plan.transfers, "the budget streams weights"
    for _ in range(2):  # the second call reuses slots the first one dropped
        assert_same_output(expected, fast(**inputs))
    assert engine.staging_bytes <= 3 * 4096, "host memory for staging is the ring, whatever the model"
    if storage == "host":
        assert pinned.pinned_bytes > 0, "host weights were copied straight from pinned memory"
    fast.release()
    assert pinned.pinned_bytes == 0 and pinned.pinner.ranges == {}
    streams.close()


@pytest.mark.parametrize("copy_delay_s, kernel_delay_s", [(0.0, 0.003), (0.003, 0.0)])
def test_kernels_see_landed_weights_and_copies_never_overwrite_weights_in_use(copy_delay_s, kernel_delay_s):
    # Compute runs on its own thread here; each "kernel" reads a transfer's weights. Slow
    # kernels catch copies that do not wait for drops; slow copies catch kernels that do not
    # wait for landing.
    captured, plan = planned()
    assert any(a.offsets == b.offsets for a in plan.transfers for b in plan.transfers if a.id != b.id), \
        "the plan reuses slots"
    values = {w.name: w.value for w in captured.weights}
    streams = ThreadStreams(copy_delay_s=copy_delay_s, async_compute=True)
    engine = CudaEngine(plan, resolve_weights(captured.weights, None), torch.device("cpu"), ResidentStore(),
                        streams=streams, pinned=small_pinned(), slot_bytes=4096, slots=2, readers=2)
    engine.activate()
    seen: list[tuple[str, torch.Tensor]] = []

    def kernel(names, tensors):
        time.sleep(kernel_delay_s)
        seen.extend((n, t.clone()) for n, t in zip(names, tensors))

    for _ in range(2):
        engine.begin_call()
        for step in plan.steps:
            if step.op == "fetch":
                engine.fetch(step.transfer)
            elif step.op == "wait":
                tensors = engine.wait(step.transfer)
                streams.launch(lambda names=step.names, tensors=tensors: kernel(names, tensors))
            else:
                engine.drop(step.transfer)
        engine.end_call()
    streams.synchronize_stream(streams.compute_stream())
    assert len(seen) == 2 * sum(len(t.names) for t in plan.transfers)
    assert all(torch.equal(t, values[n]) for n, t in seen)
    engine.deactivate()
    streams.close()


def streaming_llama(folder, storage: str):
    """A tiny Llama saved to ``folder``, compiled to stream from disk or host memory; its eager
    output, the compiled module and the inputs."""
    eager = build_saved(ARCHS["llama"], folder)
    inputs = ARCHS["llama"].inputs()
    with torch.no_grad():
        expected = eager(**inputs)
    disk = vramfx.DiskMap(folder)
    weights = disk if storage == "disk" else {k: disk[k] for k in disk}
    empty = build_empty(ARCHS["llama"])
    fast = vramfx.compile(empty, budget=streaming_budget(empty, disk, inputs), weights=weights, device="cpu",
                          example_kwargs=inputs)
    return expected, fast, inputs


def test_a_read_failure_raises_at_wait_and_the_next_call_runs_clean(tmp_path, monkeypatch):
    expected, fast, inputs = streaming_llama(tmp_path, "disk")
    streams = ThreadStreams(copy_delay_s=0.0005)
    use_cuda_engine(fast, streams, pin_host=False)
    fast(**inputs)  # residents in place; the failure below hits streamed weights
    threads = threading.active_count()
    real = cuda_module.read_range

    def broken(ref, start, out, **kwargs):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(cuda_module, "read_range", broken)
    with pytest.raises(vramfx.WeightsError, match=r"reading weights .* failed: .*injected"):
        fast(**inputs)
    monkeypatch.setattr(cuda_module, "read_range", real)
    assert_same_output(expected, fast(**inputs))
    fast.release()
    assert threading.active_count() <= threads
    streams.close()


def test_when_pinning_hits_a_limit_weights_are_staged_with_one_warning(tmp_path, caplog):
    expected, fast, inputs = streaming_llama(tmp_path, "host")
    streams = ThreadStreams(copy_delay_s=0.0005)
    pinned = small_pinned(limit_bytes=8 * PAGE)
    use_cuda_engine(fast, streams, pinned=pinned)
    with caplog.at_level(logging.WARNING, logger="vramfx.runtime.pinned"):
        for _ in range(2):
            assert_same_output(expected, fast(**inputs))
    assert len([r for r in caplog.records if "could not page-lock" in r.getMessage()]) == 1
    assert 0 < pinned.pinned_bytes <= 8 * PAGE
    fast.release()
    streams.close()


# -- on a GPU ----------------------------------------------------------------------------------

def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.cuda
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_on_the_gpu_compiled_equals_eager_within_the_budget(tmp_path, storage):
    needs_cuda()
    from vramfx.measure import PeakMemory

    torch.manual_seed(0)
    eager = ARCHS["llama"].build().eval().to(torch.bfloat16)
    eager.save_pretrained(tmp_path)
    eager = eager.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in ARCHS["llama"].inputs().items()}
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    disk = vramfx.DiskMap(tmp_path)
    weights = disk if storage == "disk" else {k: disk[k] for k in disk}
    empty = build_empty(ARCHS["llama"]).to(torch.bfloat16)
    weight_bytes = sum(disk.info(k).nbytes for k in disk)
    fast = vramfx.compile(empty, budget=64 * 2**20 + weight_bytes // 2, weights=weights, device="cuda",
                          example_kwargs=inputs)
    assert isinstance(fast.compiled_graphs[0].engine, CudaEngine)
    with PeakMemory("cuda") as peak:
        for _ in range(2):
            actual = fast(**inputs).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1.6e-2)
    assert peak.growth_bytes <= fast.plan.budget_bytes
    fast.release()


@pytest.mark.cuda
def test_on_the_gpu_host_weights_are_pinned_in_place():
    needs_cuda()

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(6))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    model = Stack().eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1024)
    with torch.no_grad():
        expected = model.cuda()(x.cuda())
    with vramfx.skip_model_initialization():
        empty = Stack().eval()
    fast = vramfx.compile(empty, budget=64 * 2**20 + 10 * 2**20, weights=weights, device="cuda", example_args=(x.cuda(),))
    engine = fast.compiled_graphs[0].engine
    torch.testing.assert_close(fast(x.cuda()), expected)
    assert engine.pinned is not None and engine.pinned.pinned_bytes > 0
    fast.release()
    assert engine.pinned.pinned_bytes == 0
