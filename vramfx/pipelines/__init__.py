"""Whole diffusers pipelines under one budget: every component with weights compiled, each planned
for the memory left while it runs and for its calls per generation."""

from vramfx.pipelines.members import PipelineMember
from vramfx.pipelines.pipeline import PipelineBudget, compile_pipeline

__all__ = ["PipelineBudget", "PipelineMember", "compile_pipeline"]
