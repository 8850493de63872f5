"""Random models for hypothesis: DAGs of the layers large models are made of, as plain recipes.

A :class:`Recipe` is plain data (it prints, shrinks and replays); :class:`RecipeModel` builds the
``nn.Module`` it describes. Values flow as ``(batch, seq, width)`` tensors; ``seq`` is
``height * width`` of an image so a Conv2d can read any value. The steps cover Linear, Conv2d,
LayerNorm / RMSNorm, Embedding, SDPA attention, residual adds, concatenations and splits, a
module called at two places, a weight tied between two modules (an LLM's embedding and output
head), and parameters read directly in ``forward``.

A plain module the tests import (``from random_models import ...``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

#: Widths a value may have; concatenations add two of them.
WIDTHS = (4, 8, 12, 16, 32)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The step kinds a recipe draws from (see :class:`Step`).
OPS = ("linear", "conv", "norm", "embed", "attention", "add", "concat", "split", "reuse", "tied_head", "param")


@dataclass(frozen=True)
class Step:
    """One layer: ``op`` reads the values at ``inputs`` and appends its outputs to the values.

    ``width`` is the output width (for ``split``, the width of the first piece); ``option`` is
    the op's variant: bias or not, kernel size, norm kind, head count, ``"scale"``/``"matmul"``,
    or for ``reuse``/``tied_head`` the index of the step whose module or weight is shared.
    """

    op: str
    inputs: tuple[int, ...]
    width: int
    option: object = None


@dataclass(frozen=True)
class Recipe:
    """A whole model: input shape, dtype, steps in order, and which values it returns."""

    batch: int
    height: int
    width_px: int
    in_width: int
    vocab: int
    dtype_name: str
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def seq(self) -> int:
        return self.height * self.width_px

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An example call ``(x, ids)``; different seeds give different values, same signature."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.seq, self.in_width, generator=g).to(self.dtype)
        ids = torch.randint(0, self.vocab, (self.batch, self.seq), generator=g)
        return x, ids


class RecipeModel(nn.Module):
    """The model a :class:`Recipe` describes; ``forward(x, ids)`` returns a tuple of values."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        dtype = recipe.dtype
        widths = [recipe.in_width]
        self.layers = nn.ModuleDict()
        self.params = nn.ParameterDict()
        for i, step in enumerate(recipe.steps):
            key = f"s{i}"
            w_in = widths[step.inputs[0]] if step.inputs else 0
            if step.op == "linear":
                self.layers[key] = nn.Linear(w_in, step.width, bias=step.option, dtype=dtype)
            elif step.op == "conv":
                kernel, bias = step.option
                self.layers[key] = nn.Conv2d(w_in, step.width, kernel, padding=kernel // 2, bias=bias, dtype=dtype)
            elif step.op == "norm":
                if step.option == "rms":
                    self.layers[key] = nn.RMSNorm(w_in, dtype=dtype)
                else:
                    self.layers[key] = nn.LayerNorm(w_in, bias=step.option == "layer", dtype=dtype)
            elif step.op == "embed":
                self.layers[key] = nn.Embedding(recipe.vocab, step.width, dtype=dtype)
            elif step.op == "attention":
                self.layers[key] = nn.ModuleDict(
                    {"qkv": nn.Linear(w_in, 3 * w_in, dtype=dtype), "out": nn.Linear(w_in, w_in, dtype=dtype)}
                )
            elif step.op == "tied_head":
                head = nn.Linear(w_in, recipe.vocab, bias=False, dtype=dtype)
                head.weight = self.layers[f"s{step.option}"].weight  # tied: one tensor, two modules
                self.layers[key] = head
            elif step.op == "param":
                if step.option == "scale":
                    self.params[key + "_scale"] = nn.Parameter(1 + 0.1 * torch.randn(w_in).to(dtype))
                    self.params[key + "_shift"] = nn.Parameter(0.1 * torch.randn(w_in).to(dtype))
                else:
                    self.params[key] = nn.Parameter(torch.randn(w_in, step.width).to(dtype) / w_in**0.5)
            widths.extend(_out_widths(step, widths))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for i, step in enumerate(self.recipe.steps):
            values.extend(self._run(f"s{i}", step, values, ids))
        return tuple(values[j] for j in self.recipe.outputs)

    def _run(self, key: str, step: Step, values: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
        a = values[step.inputs[0]] if step.inputs else None
        op = step.op
        if op in ("linear", "norm", "tied_head"):
            return [self.layers[key](a)]
        if op == "reuse":
            return [self.layers[f"s{step.option}"](a)]
        if op == "conv":
            batch, _, width = a.shape
            image = a.transpose(1, 2).reshape(batch, width, self.recipe.height, self.recipe.width_px)
            out = self.layers[key](image)
            return [out.reshape(batch, step.width, -1).transpose(1, 2)]
        if op == "embed":
            return [self.layers[key](ids)]
        if op == "attention":
            layer, heads = self.layers[key], step.option
            batch, seq, width = a.shape
            q, k, v = layer["qkv"](a).view(batch, seq, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
            return [layer["out"](out.transpose(1, 2).reshape(batch, seq, width))]
        if op == "add":
            return [a + values[step.inputs[1]]]
        if op == "concat":
            return [torch.cat([a, values[step.inputs[1]]], dim=-1)]
        if op == "split":
            return list(torch.split(a, [step.width, a.shape[-1] - step.width], dim=-1))
        if op == "param":
            if step.option == "scale":
                return [a * self.params[key + "_scale"] + self.params[key + "_shift"]]
            return [a @ self.params[key]]
        raise AssertionError(f"unknown op {op!r}")


def _out_widths(step: Step, widths: list[int]) -> list[int]:
    """The widths of the values ``step`` appends."""
    w_in = widths[step.inputs[0]] if step.inputs else 0
    if step.op in ("norm", "attention", "add") or (step.op == "param" and step.option == "scale"):
        return [w_in]
    if step.op == "concat":
        return [w_in + widths[step.inputs[1]]]
    if step.op == "split":
        return [step.width, w_in - step.width]
    return [step.width]


# ---------------------------------------------------------------------------------------------
# Strategies


@st.composite
def recipes(draw: st.DrawFn, max_steps: int = 8) -> Recipe:
    """A random model: 1..``max_steps`` layers over earlier values, dtype f32, bf16 or f16."""
    vocab = draw(st.sampled_from([5, 16, 24]))
    in_width = draw(st.sampled_from(WIDTHS))
    widths = [in_width]
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(_steps(tuple(widths), tuple(steps), vocab))
        steps.append(step)
        widths.extend(_out_widths(step, widths))
    last = len(widths) - 1
    extra = draw(st.lists(st.integers(1, last), max_size=2, unique=True)) if last > 1 else []
    outputs = tuple(dict.fromkeys([last, *extra]))
    return Recipe(
        batch=draw(st.integers(1, 2)),
        height=draw(st.integers(1, 3)),
        width_px=draw(st.integers(1, 3)),
        in_width=in_width,
        vocab=vocab,
        dtype_name=str(draw(st.sampled_from(DTYPES))).removeprefix("torch."),
        steps=tuple(steps),
        outputs=outputs,
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def _steps(draw: st.DrawFn, widths: tuple[int, ...], steps: tuple[Step, ...], vocab: int) -> Step:
    """One step that is valid after ``steps``, whose values have ``widths``."""
    value = st.integers(0, len(widths) - 1)
    reusable = [i for i, s in enumerate(steps) if s.op == "linear"]
    embeddings = [i for i, s in enumerate(steps) if s.op == "embed"]
    op = draw(st.sampled_from(OPS))
    if op in ("add", "concat"):
        a = draw(value)
        same = [j for j, w in enumerate(widths) if w == widths[a]]
        b = draw(st.sampled_from(same if op == "add" else range(len(widths))))
        if widths[a] + widths[b] > 64:
            op = "linear"
        else:
            return Step(op, (a, b), 0)
    if op == "reuse" and reusable:
        s = draw(st.sampled_from(reusable))
        w_in = widths[steps[s].inputs[0]]  # the shared Linear's in_features
        matching = [j for j, w in enumerate(widths) if w == w_in]
        if matching:
            return Step("reuse", (draw(st.sampled_from(matching)),), steps[s].width, s)
    if op == "tied_head" and embeddings:
        e = draw(st.sampled_from(embeddings))
        matching = [j for j, w in enumerate(widths) if w == steps[e].width]
        if matching:
            return Step("tied_head", (draw(st.sampled_from(matching)),), vocab, e)
    if op == "embed":
        return Step("embed", (), draw(st.sampled_from(WIDTHS)))
    a = draw(value)
    w_in = widths[a]
    if op == "split" and w_in >= 2:
        return Step("split", (a,), draw(st.integers(1, w_in - 1)))
    if op == "conv":
        return Step("conv", (a,), draw(st.sampled_from(WIDTHS)), (draw(st.sampled_from([1, 3])), draw(st.booleans())))
    if op == "norm":
        return Step("norm", (a,), w_in, draw(st.sampled_from(["layer", "layer_no_bias", "rms"])))
    if op == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if w_in % h == 0]))
        return Step("attention", (a,), w_in, heads)
    if op == "param":
        kind = draw(st.sampled_from(["scale", "matmul"]))
        return Step("param", (a,), w_in if kind == "scale" else draw(st.sampled_from(WIDTHS)), kind)
    return Step("linear", (a,), draw(st.sampled_from(WIDTHS)), draw(st.booleans()))


#: One model with every step kind (tied head, a module called twice, parameters read directly),
#: which the equivalence test always runs besides the random ones.
EVERY_OP = Recipe(
    batch=2,
    height=2,
    width_px=3,
    in_width=16,
    vocab=24,
    dtype_name="bfloat16",
    steps=(
        Step("embed", (), 16),  # value 1
        Step("add", (0, 1), 0),  # 2: residual
        Step("norm", (2,), 16, "rms"),  # 3
        Step("attention", (3,), 16, 2),  # 4
        Step("linear", (4,), 32, True),  # 5
        Step("split", (5,), 12),  # 6 (12 wide) and 7 (20 wide)
        Step("concat", (6, 0), 0),  # 8: 28 wide
        Step("conv", (8,), 16, (3, True)),  # 9
        Step("reuse", (9,), 32, 4),  # 10: the Linear of step 4 again
        Step("param", (10,), 32, "scale"),  # 11
        Step("param", (11,), 16, "matmul"),  # 12
        Step("norm", (12,), 16, "layer"),  # 13
        Step("tied_head", (13,), 24, 0),  # 14: the embedding's weight again
    ),
    outputs=(14, 7),
    seed=7,
)
