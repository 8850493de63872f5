"""A workload for ``vramfx plan``: a whole diffusers pipeline and one call of it.

    vramfx plan examples/plan_pipeline.py:flux --budget 100MB --device cpu

``ROOT`` is a folder a pipeline was saved to (``save_pretrained``); by default a tiny Flux
pipeline is written to a temporary folder first, so the example runs anywhere.
"""

import os
import sys
import tempfile
from pathlib import Path

from vramfx.workload import PipelineWorkload


def flux() -> PipelineWorkload:
    from diffusers import FluxPipeline

    root = os.environ.get("ROOT")
    if root is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_pipelines import save_flux

        root = save_flux(Path(tempfile.mkdtemp(prefix="vramfx-flux-")))
    call = dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=20, max_sequence_length=8)
    return PipelineWorkload(FluxPipeline, root, call)
