"""A pipeline's plan as a table: one row per unit, its calls, share and planned peak."""

from __future__ import annotations

from typing import Any

import torch

from vramfx.util import format_bytes, format_seconds


def plan_pipeline_table(workload: Any, budget_bytes: int, device: torch.device, budget_text: str) -> str:
    """Plan ``workload`` (a :class:`~vramfx.workload.PipelineWorkload`) under ``budget_bytes`` and
    describe it; nothing runs and no weight is read.

    Raises
    ------
    BudgetError
        The budget is below the pipeline's minimum, which it states.
    """
    from vramfx.pipelines.pipeline import compile_pipeline

    pipe = compile_pipeline(workload.pipeline, workload.root, budget_bytes, device=device, example=workload.call)
    return pipeline_table(pipe.vramfx.report(), budget_bytes, budget_text,
                          pipe.vramfx.tensor_bytes, type(pipe).__name__)


def pipeline_table(rows: list[dict[str, Any]], budget_bytes: int, budget_text: str, tensor_bytes: int,
                   title: str) -> str:
    """The rows of :meth:`PipelineBudget.report` as text.

    Examples
    --------
    >>> print(pipeline_table([dict(unit="transformer", calls=20, kept=False, reserve_bytes=2048,
    ...                            peak_bytes=10**6, resident_bytes=0, streamed_bytes=500,
    ...                            seconds_per_call=0.5)], 2 * 10**6, "2MB", 1024, "FluxPipeline"))
    FluxPipeline under 2MB = 1.9 MiB, components one at a time; 1.0 KiB of pipeline tensors between them
    component        calls  between generations  leaves to others   planned peak   resident   streamed/call   predicted/call
    transformer         20  released                      2.0 KiB      976.6 KiB        0 B           500 B         500.0 ms
    """
    b = format_bytes
    lines = [
        f"{title} under {budget_text} = {b(budget_bytes)}, components one at a time; "
        f"{b(tensor_bytes)} of pipeline tensors between them",
        f"{'component':16} {'calls':>5}  {'between generations':20} {'leaves to others':>16} {'planned peak':>14} "
        f"{'resident':>10} {'streamed/call':>15} {'predicted/call':>16}",
    ]
    for r in rows:
        lines.append(
            f"{r['unit']:16} {r['calls']:>5}  {'kept' if r['kept'] else 'released':20} {b(r['reserve_bytes']):>16} "
            f"{b(r['peak_bytes']):>14} {b(r['resident_bytes']):>10} {b(r['streamed_bytes']):>15} "
            f"{format_seconds(r['seconds_per_call']):>16}"
        )
    return "\n".join(lines)
