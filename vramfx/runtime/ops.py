"""The vramfx steps as graph-callable functions: ``fetch``, ``wait``, ``drop``, ``resident``, ``cast``.

The rewritten graph takes the engine as its first input and calls these with a transfer id, a
weight name or a cast's index in the plan. They are opaque to ``torch.compile`` so a user who also
compiles the model gets the transfers run as written, not traced through.
"""

from __future__ import annotations

import torch


@torch.compiler.disable
def fetch(engine, transfer: int) -> None:
    """Start copying a transfer's weights into their arena slots; returns at once."""
    engine.fetch(transfer)


@torch.compiler.disable
def wait(engine, transfer: int) -> tuple[torch.Tensor, ...]:
    """Block until a transfer has landed; its weights, as tensors viewing the arena."""
    return engine.wait(transfer)


@torch.compiler.disable
def drop(engine, transfer: int) -> None:
    """The transfer's last reader has run: its arena slots may be reused."""
    engine.drop(transfer)


@torch.compiler.disable
def resident(engine, name: str) -> torch.Tensor:
    """A weight the plan keeps on the device across calls."""
    return engine.resident(name)


@torch.compiler.disable
def cast(engine, stored: torch.Tensor, index: int) -> torch.Tensor:
    """A weight stored in a low dtype, converted to its compute dtype into a planned slot."""
    return engine.cast(index, stored)
