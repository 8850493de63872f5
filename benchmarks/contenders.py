"""The workloads and the contenders of ``benchmarks/run.py``: how each one is built and called.

A workload is a model with random weights saved once to safetensors under a cache folder, plus
its inputs. A contender turns a workload into a callable under test: eager with every weight in
memory, vramfx at a budget, the layer-swap path, and the tools users would pick instead
(accelerate's ``disk_offload``/``cpu_offload``, diffusers' group offloading from disk).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import vramfx
from vramfx.util import format_bytes

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Workload:
    """A model to build (with random weights) and the call to time."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def folder(self) -> Path:
        """Where its weights are cached, keyed by its config so a change rebuilds them."""
        key = hashlib.sha1(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return CACHE / f"{self.name}-{key}"


def _llama(layers: int, hidden: int, inter: int, vocab: int, seq: int) -> Workload:
    from transformers import LlamaConfig, LlamaModel

    # The full size is compile_cpu.py's and swap_cpu.py's workload (benchmarks/workloads.py).
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
               max_position_embeddings=max(512, seq))
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    return Workload("llama", lambda: LlamaModel(LlamaConfig(**cfg)).eval(),
                    lambda: {"input_ids": ids, "use_cache": False}, {**cfg, "seq": seq})


def _flux(double: int, single: int, heads: int, tokens: int, text: int) -> Workload:
    from diffusers import FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
               num_attention_heads=heads, joint_attention_dim=1024, pooled_projection_dim=768,
               axes_dims_rope=(16, 56, 56))
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, tokens, 64, generator=g),
              "encoder_hidden_states": torch.randn(1, text, 1024, generator=g),
              "pooled_projections": torch.randn(1, 768, generator=g), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3), "return_dict": False}
    return Workload("flux", lambda: FluxTransformer2DModel(**cfg).eval(), lambda: inputs,
                    {**cfg, "tokens": tokens, "text": text})


def _unet(channels: tuple[int, ...], size: int) -> Workload:
    from diffusers import UNet2DConditionModel

    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    cfg = dict(block_out_channels=channels, layers_per_block=2, sample_size=size, cross_attention_dim=768,
               attention_head_dim=8, down_block_types=down, up_block_types=up,
               norm_num_groups=min(32, channels[0]))
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, size, size, generator=g), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 16, 768, generator=g), "return_dict": False}
    return Workload("unet", lambda: UNet2DConditionModel(**cfg).eval(), lambda: inputs, cfg)


def workloads(smoke: bool) -> list[Workload]:
    """~0.8 GB fp32 each; two tiny ones for ``--smoke`` (every contender, every code path)."""
    if smoke:
        return [_llama(2, 64, 128, 256, 16), _flux(1, 1, 2, 16, 8)]
    return [_llama(16, 1024, 2816, 8192, 128), _flux(3, 6, 8, 256, 64), _unet((160, 320, 640, 640), 32)]


def ensure_saved(workload: Workload) -> Path:
    """Save the workload's random weights once; later runs reuse the file."""
    folder = workload.folder()
    target = folder / "model.safetensors"
    if not target.exists():
        torch.manual_seed(0)
        model = workload.build()
        tmp = Path(tempfile.mkdtemp(dir=CACHE if CACHE.exists() else None))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(_untied(state), tmp / "model.safetensors")
        del model, state
        gc.collect()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "model.safetensors"), target)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_aligned(workload: Workload, dtype: torch.dtype | None = None) -> Path:
    """The workload's weights rewritten once by ``vramfx.convert``: the same tensors (in ``dtype``,
    every floating-point one, when given), each whose size allows it 64-byte aligned in the file,
    so vramfx uses them in place."""
    folder = ensure_saved(workload)
    aligned = folder / ("aligned" if dtype is None else f"aligned-{str(dtype).removeprefix('torch.')}")
    if not aligned.exists():
        tmp = aligned.with_name(aligned.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        vramfx.convert(folder / "model.safetensors", tmp, dtype=dtype, keep_in_compute_dtype=None)
        tmp.rename(aligned)
    return aligned


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; keep the first name of each tied tensor."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def weight_bytes(folder: Path) -> int:
    with vramfx.DiskMap(folder) as weights:
        return weights.nbytes


def loaded(workload: Workload, folder: Path) -> torch.nn.Module:
    """The model with every weight in memory (what eager and the peers start from)."""
    with vramfx.skip_model_initialization():
        model = workload.build()
    with vramfx.DiskMap(folder) as weights:
        model.load_state_dict(dict(weights), assign=True, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


@dataclass
class Contender:
    """A callable under test, what it holds, and how to undo it."""

    name: str
    call: Callable[[], Any]
    streamed_bytes: int | None = None  # per call, where the contender knows it
    close: Callable[[], None] = lambda: None
    read_bytes_per_call: int | None = None
    predicted_s: float | None = None  # the plan's predicted seconds per call, for vramfx
    note: str = ""
    dtype: torch.dtype = torch.float32  # eager in the same dtype is the row's reference


def eager(workload: Workload, folder: Path, inputs: dict[str, Any], dtype: torch.dtype = torch.float32) -> Contender:
    model = loaded(workload, folder).to(dtype)
    name = "eager (all weights in RAM)" + ("" if dtype == torch.float32 else ", bf16")
    return Contender(name, lambda: model(**inputs), 0, dtype=dtype)


def in_dtype(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The inputs with every floating-point tensor in ``dtype`` (what a model computing in it takes)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def vramfx_compiled(workload: Workload, folder: Path, inputs: dict[str, Any], fraction: float,
                    *, bypass_page_cache: bool = False, in_place: bool = True, label: str = "",
                    cost_model: vramfx.CostModel | None = None,
                    compute_dtype: torch.dtype | None = None) -> Contender:
    """vramfx ``compile`` at ``fraction`` of the weights' bytes, as a user calls it by default
    (weights used in place where they can be) unless ``in_place=False`` or ``bypass_page_cache``."""
    with vramfx.skip_model_initialization():
        model = workload.build().eval()
    budget = int(weight_bytes(folder) * fraction)
    name = label or f"vramfx compile @ {fraction:.0%}"
    if compute_dtype is not None:
        name += f", {str(compute_dtype).removeprefix('torch.').replace('bfloat16', 'bf16')}"
    if not in_place:
        name += ", copying (in_place=False)"
    options = dict(weights=vramfx.DiskMap(folder), device="cpu", example_kwargs=inputs,
                   bypass_page_cache=bypass_page_cache, cost_model=cost_model, in_place=in_place,
                   compute_dtype=compute_dtype)
    try:
        fast = vramfx.compile(model, budget=budget, **options)
    except vramfx.BudgetError as exc:  # tiny --smoke models: the fixed margin exceeds the fraction
        fast = vramfx.compile(model, budget=exc.minimum_bytes, **options)
        name += " (raised to the minimum)"
    plan = fast.plan
    note = f"in place {format_bytes(plan.in_place_bytes)}" if plan.in_place else ""
    if plan.reads == "direct":
        note = ", ".join(filter(None, [note, "O_DIRECT reads"]))
    return Contender(name, lambda: fast(**inputs), plan.streamed_bytes, fast.release,
                     predicted_s=plan.predicted.seconds_per_call, note=note, dtype=compute_dtype or torch.float32)


def accelerate_cpu_offload(workload: Workload, folder: Path, inputs: dict[str, Any]) -> Contender:
    import accelerate

    model = accelerate.cpu_offload(loaded(workload, folder), execution_device=torch.device("cpu"))
    return Contender("accelerate cpu_offload", lambda: model(**inputs))


def accelerate_disk_offload(workload: Workload, folder: Path, inputs: dict[str, Any]) -> Contender:
    import accelerate

    offload_dir = Path(tempfile.mkdtemp(prefix="accelerate-", dir=CACHE))
    model = accelerate.disk_offload(loaded(workload, folder), offload_dir, execution_device=torch.device("cpu"))
    return Contender("accelerate disk_offload", lambda: model(**inputs),
                     close=lambda: shutil.rmtree(offload_dir, ignore_errors=True))


def diffusers_group_offload(workload: Workload, folder: Path, inputs: dict[str, Any], kind: str) -> Contender:
    from diffusers.hooks import apply_group_offloading

    offload_dir = Path(tempfile.mkdtemp(prefix="group-", dir=CACHE))
    model = loaded(workload, folder)
    extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type=kind,
                           offload_to_disk_path=str(offload_dir), **extra)
    return Contender(f"diffusers group offload {kind}", lambda: model(**inputs),
                     close=lambda: shutil.rmtree(offload_dir, ignore_errors=True))


def swap_contenders(workload: Workload, folder: Path, inputs: dict[str, Any],
                    fraction: float) -> list[tuple[str, Callable[[], Contender]]]:
    """The vramfx layer-swap path from disk, synchronous and with prefetch (when it is installed)."""
    try:
        from vramfx import swap
    except ImportError:
        return []
    return [(f"vramfx swap {mode}", lambda mode=mode: _swap(swap, workload, folder, inputs, fraction, mode))
            for mode in ("sync", "prefetch")]


def _swap(swap: Any, workload: Workload, folder: Path, inputs: dict[str, Any], fraction: float,
          mode: str) -> Contender:
    with vramfx.skip_model_initialization():
        model = workload.build().eval()
    # Every module that owns weights is wrapped: Linear as a Linear, the rest generically.
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    module_map = {torch.nn.Linear: swap.AutoWrappedLinear,
                  **{t: swap.AutoWrappedModule for t in owners if not issubclass(t, torch.nn.Linear)}}
    limit = int(weight_bytes(folder) * fraction)
    swap.enable_vram_management(model, module_map, dict(offload_dtype="disk", offload_device="disk",
                                                        computation_device="cpu"),
                                vram_limit=f"{limit}B", disk_map=vramfx.DiskMap(folder), prefetch=mode == "prefetch")
    return Contender(f"vramfx swap ({mode}) @ {fraction:.0%}", lambda: model(**inputs),
                     close=lambda: swap.offload(model))
