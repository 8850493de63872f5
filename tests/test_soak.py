"""Soak: a thousand calls that stream from disk leak no memory, file descriptors or threads.

The layer-swap tools our users come from leaked RAM in disk mode, so that each step grew slower
until the machine swapped. Here a small Llama is called 1,000 times after a warm-up, and
the process's anonymous resident memory (RssAnon), its open file descriptors and its threads
are compared before and after.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import vramfx
from vramfx.measure import release_freed_memory
from tiny_models import ARCHS, Arch, build_empty, build_saved, streaming_budget
from vramfx.budget import rss_anon_bytes

CALLS = 1000
WARMUP_CALLS = 50
#: RssAnon may grow by less than this over all calls after the warm-up.
GROWTH_LIMIT_BYTES = 2**20


def footprint() -> tuple[int, int, int]:
    """RssAnon bytes, open file descriptors and live threads of this process, after a GC and with the
    heap the allocator keeps after frees handed back: what is live, so a leak shows and the
    allocator's one-time growth does not."""
    release_freed_memory()
    return rss_anon_bytes(), len(os.listdir("/proc/self/fd")), threading.active_count()


def soak(call: Callable[[], Any], expected: torch.Tensor) -> list[tuple[int, int, int]]:
    """Warm up, then ``CALLS`` calls; the footprint after the warm-up and after each fifth."""
    for _ in range(WARMUP_CALLS):
        call()
    samples = [footprint()]
    for i in range(1, CALLS + 1):
        out = call()
        if i % (CALLS // 5) == 0:
            assert torch.equal(expected, out), f"call {i} differs from eager"
            samples.append(footprint())
    return samples


def assert_flat(samples: list[tuple[int, int, int]]) -> None:
    """RssAnon grew by less than the limit; file descriptors and threads did not change."""
    (rss0, fds0, threads0), (rss1, fds1, threads1) = samples[0], samples[-1]
    rss = [s[0] for s in samples]
    assert rss1 - rss0 < GROWTH_LIMIT_BYTES, f"RssAnon grew {rss1 - rss0} B over {CALLS} calls: {rss}"
    assert [s[1] for s in samples] == [fds0] * len(samples), "open file descriptors changed"
    assert [s[2] for s in samples] == [threads0] * len(samples), "thread count changed"


def one_layer_llama() -> torch.nn.Module:
    """The suite's tiny Llama with one decoder layer: a call costs a few milliseconds."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


#: The soaked model: the one-layer Llama with the tiny Llama's inputs.
SOAKED = Arch("llama_one_layer", one_layer_llama, ARCHS["llama"].inputs)


@pytest.fixture
def llama_on_disk(tmp_path) -> dict[str, Any]:
    eager = build_saved(SOAKED, tmp_path)
    inputs = SOAKED.inputs()
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    return {"folder": tmp_path, "inputs": inputs, "expected": expected}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors and RssAnon")
@pytest.mark.parametrize(
    "bypass_page_cache",
    # The O_DIRECT path differs only inside DiskMap reads (test_diskmap covers them); it soaks
    # in the slow run to keep the default suite short.
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["page_cache", "o_direct"],
)
def test_a_thousand_compiled_calls_streaming_from_disk_leak_nothing(llama_on_disk, bypass_page_cache):
    inputs = llama_on_disk["inputs"]
    _, fds_before, threads_before = footprint()
    with vramfx.DiskMap(llama_on_disk["folder"]) as weights:
        empty = build_empty(SOAKED)
        fast = vramfx.compile(empty, budget=streaming_budget(empty, weights, inputs), weights=weights,
                              device="cpu", bypass_page_cache=bypass_page_cache)
        samples = soak(lambda: fast(**inputs).last_hidden_state, llama_on_disk["expected"])
        assert fast.plan.streamed_bytes > 0
        assert len(fast.compiled_graphs) == 1
        fast.release()
    assert_flat(samples)
    _, fds_after, threads_after = footprint()
    assert (fds_after, threads_after) == (fds_before, threads_before), "release and close left something open"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors and RssAnon")
def test_a_thousand_layer_swap_calls_from_disk_leak_nothing(llama_on_disk):
    swap = pytest.importorskip("vramfx.swap")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    inputs = llama_on_disk["inputs"]
    with vramfx.DiskMap(llama_on_disk["folder"]) as weights:
        model = build_empty(SOAKED)
        swapped = swap.enable_vram_management(
            model,
            module_map={
                torch.nn.Linear: swap.AutoWrappedLinear,
                torch.nn.Embedding: swap.AutoWrappedModule,
                LlamaRMSNorm: swap.AutoWrappedModule,
            },
            vram_config={
                "offload_dtype": "disk",
                "offload_device": "disk",
                "computation_dtype": torch.float32,
                "computation_device": "cpu",
            },
            vram_limit=0,  # nothing is kept: every call reads every weight from disk
            disk_map=weights,
        )
        model = model if swapped is None else swapped  # the original returns None, ours the model

        def call() -> torch.Tensor:
            with torch.no_grad():
                return model(**inputs).last_hidden_state

        samples = soak(call, llama_on_disk["expected"])
        del model
    assert_flat(samples)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors and RssAnon")
def test_a_hundred_calls_every_tenth_raising_inside_the_model_equal_eager_and_leak_nothing(llama_on_disk):
    """Every tenth call passes a token the embedding does not have: the graph raises at that node,
    mid-call with copies in flight, as eager raises. The other calls equal eager; nothing grows."""
    inputs = llama_on_disk["inputs"]
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 3] = 10_000  # outside the vocabulary of 128
    with torch.no_grad(), pytest.raises(IndexError):
        SOAKED.build().eval()(**bad)  # eager raises too
    with vramfx.DiskMap(llama_on_disk["folder"]) as weights:
        empty = build_empty(SOAKED)
        fast = vramfx.compile(empty, budget=streaming_budget(empty, weights, inputs), weights=weights, device="cpu",
                              example_kwargs=inputs)
        assert fast.plan.streamed_bytes > 0

        def calls(first: int, last: int) -> None:
            for i in range(first, last + 1):
                if i % 10 == 0:
                    with pytest.raises(IndexError, match="index out of range"):
                        fast(**bad)
                else:
                    assert torch.equal(llama_on_disk["expected"], fast(**inputs).last_hidden_state), i

        calls(1, 20)  # warm-up: two failed calls included
        samples = [footprint()]
        for first in range(21, 101, 20):
            calls(first, first + 19)
            samples.append(footprint())
        assert len(fast.compiled_graphs) == 1 and fast.module_path is None
        fast.release()
    assert_flat(samples)
