"""``generate`` on captured graphs: a static KV cache keeps every decoding step's shapes fixed.

transformers' default cache grows by one position per token: a new input signature every step,
which a captured graph would have to be exported and planned for each time. A ``StaticCache``
(``cache_implementation="static"``) is allocated once at its final length and written in place
at ``cache_position``, so the prompt's call is one signature and every decoding step another:
two graphs per (prompt length, ``max_length``), planned once, each step fetching weights ahead as
the plan says. Tokens equal eager's with the same cache; eager's default dynamic cache computes
attention over a growing instead of a masked fixed-length cache, so its logits may differ in the
last bits (greedy tokens agree unless two logits tie that closely).

The model's own ``generate`` (``GenerationMixin``) runs with the compiled model as ``self``: every
call it makes goes through the compiled graphs. Models whose cache transformers cannot make
static (``_can_compile_fullgraph`` false), a cache the caller chose, or ``use_cache=False`` run as
asked; a call signature export cannot express falls back to the module path for that signature
only, as any call does.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Arguments by which a caller chooses the cache generate uses; any of them leaves it as asked.
CACHE_CHOICES = ("past_key_values", "cache", "cache_implementation", "use_cache")


def generate_on_graphs(compiled: Any, model_class: type, *args: Any, **kwargs: Any) -> Any:
    """``model_class.generate`` run on ``compiled``, with a static cache unless the caller chose one.

    Returns what the model's ``generate`` returns.
    """
    config = kwargs.get("generation_config") or getattr(compiled.model, "generation_config", None)
    chosen = any(name in kwargs for name in CACHE_CHOICES) or getattr(config, "cache_implementation", None)
    if not chosen and static_cache_supported(model_class):
        kwargs["cache_implementation"] = "static"
    if hasattr(config, "disable_compile"):  # transformers >= 4.50 compiles static-cache decoding itself
        # The compiled graphs are the compiled form; torch.compile on top only adds graph breaks.
        kwargs.setdefault("disable_compile", True)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers reads the device from parameters, meta here; the compiled model's is right.
        warnings.filterwarnings("ignore", message=r"You are calling \.generate\(\) with the `input_ids` being on a device")
        return model_class.generate(compiled, *args, **kwargs)


def static_cache_supported(model_class: type) -> bool:
    """Whether transformers can run ``model_class`` with a static cache."""
    return bool(getattr(model_class, "_can_compile_fullgraph", False) or getattr(model_class, "_supports_static_cache", False))
