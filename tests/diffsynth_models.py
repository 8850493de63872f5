"""DiffSynth-Studio's own DiTs at tiny sizes, its module maps and its pipelines' model functions.

Imported only when ``diffsynth`` is installed (``pip install --no-deps diffsynth==2.1.12`` plus the
``diffsynth-test`` extra). Its package imports torchvision, pandas and modelscope at the top of
modules these models never call into (datasets, image transforms, downloads); where those are not
installed they are stubbed while DiffSynth-Studio is imported, and the stubs removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

#: Packages DiffSynth-Studio imports at module level and these models never use.
UNUSED = ("torchvision", "pandas", "modelscope")
#: What DiffSynth-Studio's imports need, for the skip reason.
NEEDS = ("diffsynth", "einops", "imageio", "ftfy")

WAN_MAP = "diffsynth.models.wan_video_dit.WanModel"
QWEN_MAP = "diffsynth.models.qwen_image_dit.QwenImageDiT"


def missing() -> list[str]:
    """The packages DiffSynth-Studio's imports need that are not installed."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


class _Unused(types.ModuleType):
    """A stand-in module: any name in it is a class that refuses to be used."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*_: Any, **__: Any) -> None:
            raise RuntimeError(f"{self.__name__}.{name} is a stand-in: the package is not installed")

        return type(name, (), {"__init__": refuse})


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Unused(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    roots = tuple(name for name in UNUSED if importlib.util.find_spec(name) is None)
    # transformers asks once whether torchvision is installed: the answer must be the real one.
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    finder = _StandIns(roots)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in roots]:
            del sys.modules[name]


def load() -> types.SimpleNamespace:
    """DiffSynth-Studio's pieces the tests and the benchmark use."""
    with _stand_ins():
        layers = importlib.import_module("diffsynth.core.vram.layers")
        disk_map = importlib.import_module("diffsynth.core.vram.disk_map")
        maps = importlib.import_module("diffsynth.configs.vram_management_module_maps")
        wan = importlib.import_module("diffsynth.models.wan_video_dit")
        wan_pipeline = importlib.import_module("diffsynth.pipelines.wan_video")
        qwen = importlib.import_module("diffsynth.models.qwen_image_dit")
        qwen_pipeline = importlib.import_module("diffsynth.pipelines.qwen_image")
        general = importlib.import_module("diffsynth.models.general_modules")
    return types.SimpleNamespace(
        layers=layers,
        enable_vram_management=layers.enable_vram_management,
        DiskMap=disk_map.DiskMap,
        maps=maps.VRAM_MANAGEMENT_MODULE_MAPS,
        wan=wan,
        model_fn_wan_video=wan_pipeline.model_fn_wan_video,
        WanVideoPipeline=wan_pipeline.WanVideoPipeline,
        qwen=qwen,
        model_fn_qwen_image=qwen_pipeline.model_fn_qwen_image,
        general=general,
    )


def classes(module_map: dict[str, str]) -> dict[type, type]:
    """A map of dotted names imported, as DiffSynth-Studio's ModelPool imports it for its own use."""

    def imported(dotted: str) -> type:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    return {imported(k): imported(v) for k, v in module_map.items()}


def tiny_wan(ds: types.SimpleNamespace, *, dim: int = 64, layers: int = 3) -> torch.nn.Module:
    """DiffSynth-Studio's WanModel with a tiny config (text-to-video, as Wan2.1-T2V's)."""
    return ds.wan.WanModel(
        dim=dim, in_dim=16, ffn_dim=2 * dim, out_dim=16, text_dim=48, freq_dim=32, eps=1e-6,
        patch_size=(1, 2, 2), num_heads=2, num_layers=layers, has_image_input=False,
    ).eval()


def wan_inputs(generator: torch.Generator, frames: int = 3, size: int = 8) -> dict[str, torch.Tensor]:
    return dict(
        latents=torch.randn(1, 16, frames, size, size, generator=generator),
        timestep=torch.tensor([500.0]),
        context=torch.randn(1, 7, 48, generator=generator),
    )


def tiny_qwen(ds: types.SimpleNamespace, *, dim: int = 64, heads: int = 2, layers: int = 2) -> torch.nn.Module:
    """DiffSynth-Studio's QwenImageDiT with tiny sizes: its constructor fixes them (3072 wide), so the
    same submodules are built here with small ones (64-channel latents in and out, as the real one)."""
    qwen, general = ds.qwen, ds.general
    model = qwen.QwenImageDiT.__new__(qwen.QwenImageDiT)
    torch.nn.Module.__init__(model)
    head_dim = dim // heads
    model.pos_embed = qwen.QwenEmbedRope(theta=10000, axes_dim=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8],
                                         scale_rope=True)
    model.time_text_embed = general.TimestepEmbeddings(256, dim, diffusers_compatible_format=True, scale=1000,
                                                       align_dtype_to_timestep=False)
    model.txt_norm = general.RMSNorm(48, eps=1e-6)
    model.img_in = torch.nn.Linear(64, dim)
    model.txt_in = torch.nn.Linear(48, dim)
    model.transformer_blocks = torch.nn.ModuleList(
        qwen.QwenImageTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
        for _ in range(layers)
    )
    model.norm_out = general.AdaLayerNorm(dim, single=True)
    model.proj_out = torch.nn.Linear(dim, 64)
    return model.eval()


def qwen_inputs(generator: torch.Generator, size: int = 32) -> dict[str, Any]:
    return dict(
        latents=torch.randn(1, 16, size // 8, size // 8, generator=generator),
        timestep=torch.tensor([500.0]),
        prompt_emb=torch.randn(1, 5, 48, generator=generator),
        prompt_emb_mask=torch.ones(1, 5, dtype=torch.long),
        height=size, width=size,
    )
