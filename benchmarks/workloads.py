"""The CPU Llama-like workload the CPU benchmarks share: its config, its weights on disk, a timer."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import vramfx


def llama_config(layers: int, vocab: int = 8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)


def llama_on_disk(folder: str, layers: int) -> tuple[torch.nn.Module, vramfx.DiskMap, int]:
    """A seeded LlamaModel, saved as ~400 MB shards in ``folder`` with the page cache warmed.

    Returns the eager model, a DiskMap over the shards, and the weights' bytes.
    """
    from transformers import LlamaModel

    torch.manual_seed(0)
    eager = LlamaModel(llama_config(layers)).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    eager.save_pretrained(folder, max_shard_size="400MB")
    weights = vramfx.DiskMap(folder)
    for key in weights:  # warm the page cache: these benchmarks measure the warm case
        weights[key]
    return eager, weights, weight_bytes


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
