"""Module maps: vramfx's wrapper classes, dotted names, and DiffSynth-Studio's wrapper names."""

from __future__ import annotations

import pytest
import torch

from vramfx.swap import AutoWrappedLinear, AutoWrappedModule, AutoWrappedNonRecurseModule
from vramfx.swap.maps import resolve_module_map

LAYERS = "diffsynth.core.vram.layers"


def test_names_and_the_original_wrappers_are_translated():
    resolved = resolve_module_map({
        "torch.nn.Linear": f"{LAYERS}.AutoWrappedLinear",
        "torch.nn.LayerNorm": f"{LAYERS}.AutoWrappedModule",
        torch.nn.ModuleList: f"{LAYERS}.AutoWrappedNonRecurseModule",
        torch.nn.Conv2d: "vramfx.swap.AutoWrappedModule",
        torch.nn.Embedding: AutoWrappedModule,
    })
    assert resolved == {
        torch.nn.Linear: AutoWrappedLinear,
        torch.nn.LayerNorm: AutoWrappedModule,
        torch.nn.ModuleList: AutoWrappedNonRecurseModule,
        torch.nn.Conv2d: AutoWrappedModule,
        torch.nn.Embedding: AutoWrappedModule,
    }
    assert list(resolved) == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ModuleList, torch.nn.Conv2d,
                              torch.nn.Embedding], "the order is kept: the first match wins"


def test_a_class_of_the_original_is_known_by_where_it_comes_from():
    foreign = type("AutoWrappedLinear", (torch.nn.Module,), {"__module__": LAYERS})
    assert resolve_module_map({torch.nn.Linear: foreign}) == {torch.nn.Linear: AutoWrappedLinear}


@pytest.mark.parametrize(
    ("module_map", "match"),
    [
        ({}, "module_map must be a non-empty dict"),
        ({"torch.nn.NoSuchLayer": AutoWrappedModule}, r"key 'torch.nn.NoSuchLayer' does not import: .*NoSuchLayer"),
        ({"Linear": AutoWrappedLinear}, "is not an nn.Module subclass or a dotted name"),
        ({"torch.nn.functional": AutoWrappedLinear}, "is not an nn.Module subclass"),
        ({torch.nn.Linear: torch.nn.Identity}, r"module_map\[Linear\] = 'Identity'; use AutoWrappedModule"),
        ({torch.nn.Linear: f"{LAYERS}.AutoWrappedQuantizedModule"}, "wraps layers quantized by a backend"),
        ({torch.nn.Linear: "vramfx.swap.NoSuchWrapper"}, r"\[Linear\] = 'vramfx.swap.NoSuchWrapper' does not import"),
        ({torch.nn.LayerNorm: f"{LAYERS}.AutoWrappedLinear"}, "wraps nn.Linear only"),
    ],
)
def test_bad_entries_are_refused_by_name(module_map, match):
    with pytest.raises(ValueError, match=match):
        resolve_module_map(module_map)
