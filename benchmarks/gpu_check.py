"""GPU check of the CUDA engine: equality, budgets and time ratios, side by side in one run.

On a machine with one CUDA GPU, from the repository root (about 3–5 minutes on an H200; needs
torch, transformers and safetensors, no diffusers, no network)::

    pip install --no-deps -e . && OUT=/tmp/gpu_check python benchmarks/gpu_check.py

It prints a table and writes ``gpu_check.json`` to ``$OUT`` (or ``--out``; the current folder
if neither is set). The exit status is 1 if any equality or budget check fails; the goal
figures are reported, not enforced. ``--smoke`` runs every code path on CPU with tiny sizes
(timings there mean nothing); the test suite runs it.

Two models of about 4 GB in bf16, random weights, saved to safetensors in a temporary folder:
a transformers Llama (``LlamaModel``) and a Flux-like stack of double-stream DiT blocks written
below in plain torch. For each, side by side in one process:

1. **Equality.** vramfx's output against eager with all weights on the GPU,
   ``torch.testing.assert_close`` at bf16 tolerances (``RTOL``, ``ATOL``), and whether it is
   bit-exact. Weights come from host memory (a state dict in RAM) and from disk (a DiskMap).
2. **Budget.** At 50%, 25% and 10% of the weights: ``max_memory_allocated`` growth over the
   first two calls (arena, resident weights, activations) against the budget. A budget here is
   ``fraction × weight bytes + the plan's activation peak + workspace (margin included)``:
   "10% of the weights" means that much weight memory on the device.
3. **Time ratios.** Median seconds per call against: all weights on the GPU; a synchronous
   layer swap (each block's weights copied in before it runs and dropped after, from pageable
   host memory); a "one block ahead on a side stream" prefetcher from pinned host copies,
   standing in for diffusers' group offloading with streams. And the overlap efficiency
   ``max(all-on-GPU time, streamed bytes / link bandwidth) / measured time``, where the link is
   the measured pinned host-to-device bandwidth (for disk weights, the lower of it and the
   measured read throughput of the weight files, page cache warm).

Goal figures for the DiT stack at 25% of its weights: ≤ 1.10× all-on-GPU, ≤ 0.5× the
prefetcher, overlap efficiency ≥ 0.9.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import vramfx
from vramfx.measure import PeakMemory
from vramfx.util import format_bytes

RTOL, ATOL = 1.6e-2, 1e-2  # bf16: 8 bits of mantissa
FRACTIONS = (0.50, 0.25, 0.10)
GOALS = {"vs_all_gpu_max": 1.10, "vs_prefetch_max": 0.5, "overlap_min": 0.9}


# -- the Flux-like DiT stack, in plain torch --------------------------------------------------


class RMSNorm(nn.Module):
    """Per-head query/key normalisation, as Flux does it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class StreamWeights(nn.Module):
    """One stream's half of a double-stream block: modulation, attention in/out, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.mod = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.mlp_out = nn.Linear(mlp_ratio * dim, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DoubleStreamBlock(nn.Module):
    """Image and text tokens with their own weights, attending jointly."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.img = StreamWeights(dim, heads, mlp_ratio)
        self.txt = StreamWeights(dim, heads, mlp_ratio)

    def _qkv(self, s: StreamWeights, x: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        b, n, d = x.shape
        qkv = s.qkv(modulate(s.norm1(x), mod[0], mod[1])).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return s.q_norm(q), s.k_norm(k), v

    def _rest(self, s: StreamWeights, x: torch.Tensor, attn: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        x = x + mod[2].unsqueeze(1) * s.proj(attn)
        hidden = F.gelu(s.mlp_in(modulate(s.norm2(x), mod[3], mod[4])), approximate="tanh")
        return x + mod[5].unsqueeze(1) * s.mlp_out(hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor):
        img_mod = self.img.mod(F.silu(vec)).chunk(6, dim=-1)
        txt_mod = self.txt.mod(F.silu(vec)).chunk(6, dim=-1)
        iq, ik, iv = self._qkv(self.img, img, img_mod)
        tq, tk, tv = self._qkv(self.txt, txt, txt_mod)
        attn = F.scaled_dot_product_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2))
        b, _, n, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(b, n, -1)
        t = txt.shape[1]
        return self._rest(self.img, img, attn[:, t:], img_mod), self._rest(self.txt, txt, attn[:, :t], txt_mod)


class DiTStack(nn.Module):
    """A Flux-like transformer: embeddings, double-stream blocks, output projection."""

    def __init__(self, depth: int, dim: int, heads: int, in_channels: int = 64, context_dim: int = 4096) -> None:
        super().__init__()
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(context_dim, dim)
        self.vec_in = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DoubleStreamBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        vec = self.vec_in(temb)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.blocks:
            img, txt = block(img, txt, vec)
        return self.proj_out(self.norm_out(img))


# -- the two models, at full and smoke sizes ---------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model, call it, and find its blocks."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.device, torch.dtype], dict[str, Any]]
    blocks: Callable[[nn.Module], nn.ModuleList]


def model_specs(smoke: bool) -> list[ModelSpec]:
    from transformers import LlamaConfig, LlamaModel

    if smoke:
        llama_config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        seq, dit, img_tokens, txt_tokens, context = 16, dict(depth=2, dim=64, heads=4, context_dim=32), 16, 8, 32
    else:
        # ~4.2 GB in bf16: 11 layers of a Llama-2-7B-like block plus embeddings.
        llama_config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=11,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
        # ~4.1 GB in bf16: 6 Flux-sized double blocks; a 2048x2048 image's 16384 tokens plus 512
        # text tokens make each block compute-bound on an H200 (~9 TFLOP per block).
        seq, dit, img_tokens, txt_tokens, context = 2048, dict(depth=6, dim=3072, heads=24, context_dim=4096), 16384, 512, 4096

    def llama_inputs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, llama_config.vocab_size, (1, seq), generator=g).to(device),
                "use_cache": False}

    def dit_inputs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {"img": torch.randn(1, img_tokens, 64, generator=g).to(device, dtype),
                "txt": torch.randn(1, txt_tokens, context, generator=g).to(device, dtype),
                "temb": torch.randn(1, 256, generator=g).to(device, dtype)}

    return [
        ModelSpec("llama", lambda: LlamaModel(llama_config), llama_inputs, lambda m: m.layers),
        ModelSpec("dit", lambda: DiTStack(**dit), dit_inputs, lambda m: m.blocks),
    ]


# -- baselines: synchronous layer swap, one-block-ahead prefetcher ------------------------------


def empty_model(spec: ModelSpec, dtype: torch.dtype, buffers: dict[str, torch.Tensor]) -> nn.Module:
    """The model on meta, with the reference model's buffers (computed ones such as a rotary
    ``inv_freq`` can differ in the last bit between a CPU and a GPU computation)."""
    with vramfx.skip_model_initialization():
        model = spec.build().eval().to(dtype)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    return model


def offloaded(spec: ModelSpec, host: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model with its blocks' weights in host memory and everything else on the device."""
    model = empty_model(spec, dtype, buffers)
    model.load_state_dict(host, assign=True)
    in_blocks = {id(p) for p in spec.blocks(model).parameters()}
    for p in model.parameters():
        if id(p) not in in_blocks:
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)
    return model


def attach_sync_swap(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Layer swap: before a block runs its weights are copied to the device; after, dropped."""
    for block in blocks:
        params = list(block.parameters())
        host = [p.data for p in params]

        def onload(module, args, params=params):
            for p in params:
                p.data = p.data.to(device)  # a blocking copy from pageable memory

        def offload(module, args, output, params=params, host=host):
            for p, h in zip(params, host):
                p.data = h

        block.register_forward_pre_hook(onload)
        block.register_forward_hook(offload)


class BlockPrefetcher:
    """Block ``i + 1``'s weights are copied on a side stream while block ``i`` runs.

    Host copies are pinned up front (as diffusers' group offloading with streams does), so the
    copies are asynchronous; two blocks are on the device at a time.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.params = [list(b.parameters()) for b in blocks]
        self.host = [[p.data.pin_memory() if self.cuda else p.data for p in ps] for ps in self.params]
        for ps, hs in zip(self.params, self.host):
            for p, h in zip(ps, hs):
                p.data = h
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.loaded: dict[int, tuple[list[torch.Tensor], Any]] = {}
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: self.before(i))
            block.register_forward_hook(lambda module, args, output, i=i: self.after(i))

    def load(self, i: int) -> None:
        context = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
        with context:
            tensors = [h.to(self.device, non_blocking=True) for h in self.host[i]]
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.stream)
        self.loaded[i] = (tensors, event)

    def before(self, i: int) -> None:
        if i not in self.loaded:
            self.load(i)
        tensors, event = self.loaded.pop(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors:
                # Allocated on the side stream, read and freed on the compute stream.
                t.record_stream(torch.cuda.current_stream(self.device))
        for p, t in zip(self.params[i], tensors):
            p.data = t
        if i + 1 < len(self.params):
            self.load(i + 1)

    def after(self, i: int) -> None:
        for p, h in zip(self.params[i], self.host[i]):
            p.data = h


# -- measuring --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Median wall time of ``calls`` calls after one warm-up, each synchronized."""
    fn()
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def h2d_bytes_per_s(device: torch.device, nbytes: int) -> float:
    """Pinned host to device copy bandwidth: the best of four copies (the first pays for setup)."""
    if device.type != "cuda":
        return 4e9  # CPU smoke run: the CPU cost model's link
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def read_bytes_per_s(weights: vramfx.DiskMap, pinned: bool, threads: int = 4, chunk: int = 32 * 2**20) -> float:
    """How fast reader threads read the weight files into (pinned) buffers, as the engine does."""
    jobs = [(k, s, min(chunk, weights.info(k).nbytes - s)) for k in weights for s in range(0, weights.info(k).nbytes, chunk)]
    local = threading.local()

    def read(job: tuple[str, int, int]) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(chunk, dtype=torch.uint8, pin_memory=pinned)
        key, start, size = job
        weights.read_range_into(key, start, local.buffer[:size])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, jobs))
    return weights.nbytes / (time.perf_counter() - start)


def output_tensor(out: Any) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


@dataclass
class Row:
    """One configuration's figures."""

    model: str
    config: str
    storage: str = "-"
    fraction: float | None = None
    budget_bytes: int | None = None
    peak_growth_bytes: int | None = None
    budget_ok: bool | None = None
    close: bool | None = None
    bit_exact: bool | None = None
    max_abs_diff: float | None = None
    seconds: float | None = None
    streamed_bytes: int | None = None
    resident_bytes: int | None = None
    arena_bytes: int | None = None
    predicted_seconds: float | None = None
    compile_seconds: float | None = None
    link_bytes_per_s: float | None = None
    vs_all_gpu: float | None = None
    vs_swap: float | None = None
    vs_prefetch: float | None = None
    overlap: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def compare(row: Row, expected: torch.Tensor, actual: torch.Tensor) -> None:
    row.bit_exact = bool(torch.equal(expected, actual))
    row.max_abs_diff = float((expected.float() - actual.float()).abs().max()) if expected.numel() else 0.0
    try:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
        row.close = True
    except AssertionError as exc:
        row.close = False
        row.note = str(exc).splitlines()[0][:120]


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- one model --------------------------------------------------------------------------------


def check_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, folder: Path, calls: int,
                fractions: tuple[float, ...], h2d: float, log: Callable[[str], None]) -> list[Row]:
    torch.manual_seed(0)
    with torch.device(device):
        eager = spec.build().eval().to(dtype)
    host = {k: v.detach().to("cpu").contiguous() for k, v in eager.state_dict().items()}
    buffers = {k: v.detach().to("cpu") for k, v in eager.named_buffers()}
    weight_bytes = sum(v.numel() * v.element_size() for v in host.values())
    path = folder / f"{spec.name}.safetensors"
    safetensors.torch.save_file(host, path)
    disk = vramfx.DiskMap(path)
    disk_read = read_bytes_per_s(disk, pinned=device.type == "cuda")
    log(f"{spec.name}: {format_bytes(weight_bytes)} of weights; files read at {format_bytes(disk_read)}/s")
    inputs = spec.inputs(device, dtype)
    rows: list[Row] = []

    with torch.no_grad():
        expected = output_tensor(eager(**inputs)).clone()
        all_gpu = Row(spec.name, "all weights on the GPU", fraction=1.0, bit_exact=True, close=True)
        all_gpu.seconds = seconds_per_call(lambda: eager(**inputs), calls, device)
        rows.append(all_gpu)
        del eager
        cleanup(device)

        def baseline(name: str, attach: Callable[[nn.Module], Any]) -> Row:
            model = offloaded(spec, host, buffers, dtype, device)
            attach(model)  # hooks on the blocks; they keep what they need alive
            return run_baseline(Row(spec.name, name, "host"), model, device, inputs, expected, calls)

        swap_row = baseline("layer swap (synchronous)", lambda m: attach_sync_swap(m, spec.blocks(m), device))
        prefetch_row = baseline("one block ahead, side stream", lambda m: BlockPrefetcher(spec.blocks(m), device))
        rows += [swap_row, prefetch_row]
        cleanup(device)

        empty = empty_model(spec, dtype, buffers)
        probe = vramfx.compile(empty, budget=4 * weight_bytes + 2**30, weights=host, device=device,
                               example_kwargs=inputs, cost_model=vramfx.CostModel.for_device(device.type))
        non_weight = probe.plan.activation_peak_bytes + probe.plan.workspace_bytes
        del probe
        for storage, weights, link in (("host", host, h2d), ("disk", disk, min(h2d, disk_read))):
            cost_model = vramfx.CostModel.calibrate(device, link_bytes_per_s=link) if device.type == "cuda" else \
                vramfx.CostModel.for_device("cpu", link_bytes_per_s=link)
            for fraction in fractions:
                row = Row(spec.name, "vramfx", storage, fraction, budget_bytes=int(non_weight + fraction * weight_bytes),
                          link_bytes_per_s=link)
                run_vramfx(row, empty, weights, device, inputs, expected, calls, cost_model)
                if row.seconds:
                    row.vs_all_gpu = row.seconds / all_gpu.seconds
                    row.vs_swap = row.seconds / swap_row.seconds
                    row.vs_prefetch = row.seconds / prefetch_row.seconds
                    row.overlap = max(all_gpu.seconds, row.streamed_bytes / link) / row.seconds
                rows.append(row)
                log(f"  {storage} {fraction:.0%}: {row.seconds or 0:.3f} s/call, growth "
                    f"{format_bytes(row.peak_growth_bytes or 0)} of {format_bytes(row.budget_bytes)}, exact={row.bit_exact}")
            # The layer-swap path on the same engine, at the middle fraction.
            fraction = sorted(fractions)[len(fractions) // 2]
            row = Row(spec.name, "vramfx layer swap", storage, fraction, link_bytes_per_s=link)
            run_layer_swap(row, spec, dtype, buffers, path, storage, device, inputs, expected, calls, fraction)
            if row.seconds:
                row.vs_all_gpu = row.seconds / all_gpu.seconds
                row.vs_swap = row.seconds / swap_row.seconds
                row.vs_prefetch = row.seconds / prefetch_row.seconds
                row.overlap = max(all_gpu.seconds, (row.streamed_bytes or 0) / link) / row.seconds
            rows.append(row)
            log(f"  layer swap {storage} {fraction:.0%}: {row.seconds or 0:.3f} s/call, growth "
                f"{format_bytes(row.peak_growth_bytes or 0)} of {format_bytes(row.budget_bytes or 0)}, exact={row.bit_exact}")
        disk.close()
    for row in rows:
        row.extra["weight_bytes"] = weight_bytes
    return rows


def run_baseline(row: Row, model: nn.Module, device: torch.device, inputs: dict[str, Any], expected: torch.Tensor,
                 calls: int) -> Row:
    with PeakMemory(device) as peak:
        actual = output_tensor(model(**inputs))
    row.peak_growth_bytes = peak.growth_bytes
    compare(row, expected, actual)
    row.seconds = seconds_per_call(lambda: model(**inputs), calls, device)
    return row


def run_vramfx(row: Row, empty: nn.Module, weights: Any, device: torch.device, inputs: dict[str, Any],
               expected: torch.Tensor, calls: int, cost_model: vramfx.CostModel) -> None:
    start = time.perf_counter()
    try:
        fast = vramfx.compile(empty, budget=row.budget_bytes, weights=weights, device=device, example_kwargs=inputs,
                              cost_model=cost_model)
    except vramfx.BudgetError as exc:
        row.note = f"budget below the minimum {format_bytes(exc.minimum_bytes or 0, round_up=True)}"
        return
    row.compile_seconds = time.perf_counter() - start
    plan = fast.plan
    row.streamed_bytes, row.resident_bytes, row.arena_bytes = plan.streamed_bytes, plan.resident_bytes, plan.arena_bytes
    row.predicted_seconds = plan.predicted.seconds_per_call
    with PeakMemory(device) as peak:  # the first call loads residents and allocates the arena
        fast(**inputs)  # its output is freed before the second call, as a loop over calls would
        actual = output_tensor(fast(**inputs))
    row.peak_growth_bytes = peak.growth_bytes
    row.budget_ok = peak.growth_bytes <= row.budget_bytes
    compare(row, expected, actual)
    row.seconds = seconds_per_call(lambda: fast(**inputs), calls, device)
    engine = fast.compiled_graphs[0].engine
    row.extra["engine"] = type(engine).__name__
    row.extra["staging_bytes"] = getattr(engine, "staging_bytes", None)
    pinned = getattr(engine, "pinned", None)
    row.extra["pinned_bytes"] = pinned.pinned_bytes if pinned is not None else None
    fast.release()
    del fast, actual
    cleanup(device)


def run_layer_swap(row: Row, spec: ModelSpec, dtype: torch.dtype, buffers: dict[str, torch.Tensor], path: Path,
                   storage: str, device: torch.device, inputs: dict[str, Any], expected: torch.Tensor, calls: int,
                   fraction: float) -> None:
    """``enable_vram_management`` on the empty model: its Linear layers streamed under a limit of
    ``fraction`` of their bytes, from the file or from host memory (``onload``); norms and
    embeddings put on the device once. The budget column is the limit, which covers the weights
    the runtime holds (its own count, ``held_peak_bytes``), not the eager model's activations;
    the growth column counts both."""
    from vramfx.swap import AutoWrappedLinear, enable_vram_management, onload, swap_stats

    model = empty_model(spec, dtype, buffers)
    linear = sum(m.weight.numel() * dtype.itemsize + (m.bias.numel() * dtype.itemsize if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, nn.Linear))
    limit = int(fraction * linear)
    row.budget_bytes = limit
    config = dict(offload_dtype="disk", offload_device="disk", onload_dtype=dtype, onload_device="cpu",
                  computation_dtype=dtype, computation_device=str(device))
    with PeakMemory(device) as peak:
        enable_vram_management(model, {nn.Linear: AutoWrappedLinear}, config, vram_limit=f"{limit}B",
                               disk_map=vramfx.DiskMap(path))
        if storage == "host":
            onload(model)  # host memory, page-locked where it lies by the engine
        model(**inputs)
        actual = output_tensor(model(**inputs))
    row.peak_growth_bytes = peak.growth_bytes
    compare(row, expected, actual)
    row.seconds = seconds_per_call(lambda: model(**inputs), calls, device)
    stats = swap_stats(model)
    row.budget_ok = stats.held_peak_bytes <= limit
    row.streamed_bytes, row.resident_bytes, row.arena_bytes = stats.fetched_bytes, stats.resident_bytes, stats.arena_bytes
    row.extra.update(prefetched=stats.prefetched, synchronous=stats.synchronous, wait_seconds=stats.wait_seconds,
                     held_peak_bytes=stats.held_peak_bytes, limit_bytes=limit)
    model.__dict__["_vramfx_swap"].runtime.release()
    del model, actual
    cleanup(device)


# -- output -----------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    def fmt(value: Any, spec: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        return format(value, spec)

    header = ("model", "configuration", "storage", "weights", "budget", "growth", "ok", "close", "exact",
              "ms/call", "xGPU", "xswap", "xprefetch", "overlap")
    lines = [header]
    for r in rows:
        lines.append((
            r.model, r.config, r.storage, fmt(r.fraction, ".0%"),
            format_bytes(r.budget_bytes) if r.budget_bytes else "-",
            format_bytes(r.peak_growth_bytes) if r.peak_growth_bytes is not None else "-",
            fmt(r.budget_ok), fmt(r.close), fmt(r.bit_exact),
            fmt(r.seconds * 1e3 if r.seconds else None, ".1f"), fmt(r.vs_all_gpu, ".2f"), fmt(r.vs_swap, ".2f"),
            fmt(r.vs_prefetch, ".2f"), fmt(r.overlap, ".2f"),
        ) + ((r.note,) if r.note else ()))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + ("  " + line[-1] if len(line) > len(header) else "")
                     for line in lines)


def goals(rows: list[Row]) -> dict[str, Any]:
    """The DiT figures at 25% of its weights, against the goals."""
    found = {}
    for r in rows:
        if r.model == "dit" and r.config == "vramfx" and r.fraction == 0.25 and r.seconds:
            found[r.storage] = {
                "vs_all_gpu": r.vs_all_gpu, "vs_all_gpu_met": r.vs_all_gpu <= GOALS["vs_all_gpu_max"],
                "vs_prefetch": r.vs_prefetch, "vs_prefetch_met": r.vs_prefetch <= GOALS["vs_prefetch_max"],
                "overlap": r.overlap, "overlap_met": r.overlap >= GOALS["overlap_min"],
            }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: every code path, no real timing")
    parser.add_argument("--only", choices=("llama", "dit"), help="check one model")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per configuration (median)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help=f"budgets as fractions of the weights (default {' '.join(map(str, FRACTIONS))}; "
                             "--smoke: 0.25)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: $OUT or .)")
    args = parser.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --smoke for the CPU dry run", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny kernels: spinning worker threads only slow a shared machine down
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """The whole check; the exit status."""
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    calls = args.calls or (1 if args.smoke else 5)
    fractions = tuple(args.fractions or ((0.25,) if args.smoke else FRACTIONS))
    out = args.out or Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    h2d = h2d_bytes_per_s(device, 2**30)
    log(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"pinned host-to-device {h2d / 1e9:.1f} GB/s")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vramfx-gpu-check-") as folder:
        for spec in model_specs(args.smoke):
            if args.only and spec.name != args.only:
                continue
            rows += check_model(spec, device, torch.bfloat16, Path(folder), calls, fractions, h2d, log)

    print(table(rows))
    found = goals(rows)
    for storage, figures in found.items():
        print(f"dit at 25% ({storage}): {figures['vs_all_gpu']:.2f}x all-on-GPU (goal <= {GOALS['vs_all_gpu_max']}), "
              f"{figures['vs_prefetch']:.2f}x prefetcher (goal <= {GOALS['vs_prefetch_max']}), "
              f"overlap {figures['overlap']:.2f} (goal >= {GOALS['overlap_min']})")
    failed_equal = [r for r in rows if r.close is False]
    failed_budget = [r for r in rows if r.budget_ok is False]
    import transformers

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h2d_bytes_per_s": h2d,
        "tolerances": {"rtol": RTOL, "atol": ATOL},
        "goals": GOALS,
        "goal_figures": found,
        "rows": [asdict(r) for r in rows],
        "failed_equality": len(failed_equal),
        "failed_budget": len(failed_budget),
        "seconds": time.perf_counter() - started,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {out / 'gpu_check.json'}")
    if failed_equal or (failed_budget and not args.smoke):  # RssAnon of tiny CPU models is noise
        print(f"FAILED: {len(failed_equal)} equality, {len(failed_budget)} budget checks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
