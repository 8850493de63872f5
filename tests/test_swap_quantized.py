"""The layer-swap path from quantized checkpoints: a llama.cpp GGUF streamed as its blocks and
decoded on the device per call, equal to eager on the reference dequantized weights."""

from __future__ import annotations

import pytest
import torch

import vramfx
from gguf_files import llama_gguf
from test_compile_quantized import empty_like, llama_inputs, tiny_llama
from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, enable_vram_management, onload, swap_stats

pytest.importorskip("gguf")


@pytest.mark.parametrize("linear", ["Q4_K", "Q8_0"])
@pytest.mark.parametrize("offload_device", ["disk", "cpu"])
def test_llama_from_a_gguf_on_the_layer_swap_path_equals_eager(linear, offload_device, tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = tiny_llama()
    model.load_state_dict(llama_gguf(model, tmp_path / "llama.gguf", linear))
    inputs = llama_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    weights = vramfx.GGUFMap(tmp_path / "llama.gguf")
    module_map = {torch.nn.Linear: AutoWrappedLinear, torch.nn.Embedding: AutoWrappedModule,
                  LlamaRMSNorm: AutoWrappedModule}
    config = dict(offload_dtype="disk", offload_device="disk", onload_device="cpu", computation_device="cpu")
    # Room to decode (1.5 MiB of decode temporaries, 512 KiB of float32 for what runs at once) and a
    # fifth of the blocks: most of them stream.
    limit = 3 * 2**19 + 2**19 + weights.nbytes // 5
    swapped = enable_vram_management(empty_like(tiny_llama), module_map, config, vram_limit=f"{limit}B",
                                     disk_map=weights)
    if offload_device == "cpu":
        onload(swapped)  # host memory holds the blocks as the file does
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(expected, swapped(**inputs).logits)
    stats = swap_stats(swapped)
    assert stats.held_peak_bytes <= limit and stats.cast_bytes > 0, "decoded on the device, every call"
    if offload_device == "disk":
        assert stats.fetched_bytes == stats.streamed_bytes > 0 and stats.prefetched > 0
        assert stats.fetched_bytes <= weights.nbytes, "blocks move, as stored, never decoded"
    else:  # host memory is where a CPU computes: the blocks are read where they lie
        assert stats.fetched_bytes == 0
