"""The exceptions vramfx raises, one hierarchy so callers can catch them all."""

from __future__ import annotations


class VramfxError(Exception):
    """Base class of every error vramfx raises on purpose."""


class BudgetError(VramfxError):
    """No schedule fits the budget.

    ``minimum_bytes`` is the smallest budget that plans, so a caller can retry with it.
    """

    def __init__(self, message: str, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class CaptureError(VramfxError):
    """``torch.export`` could not capture the model as one graph."""


class WeightsError(VramfxError):
    """A weights file or mapping is unreadable, corrupt, or does not match the model."""


class PlanInvariantError(VramfxError):
    """A plan broke one of the invariants that make it safe to run (a bug in the planner)."""


class RuntimeFailure(VramfxError):
    """A compiled graph failed while running; the message names the graph node."""
