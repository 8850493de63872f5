"""Whole diffusers pipelines under one budget: equal to eager, within the budget, refused up front."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, WanPipeline

import vramfx
from vramfx.measure import PeakMemory, release_freed_memory
from vramfx.pipelines import PipelineMember, compile_pipeline
from vramfx.storage.diskmap import DiskMap

from tiny_pipelines import FLUX_CALL, WAN_CALL, eager_pipeline, generator, output_of, save_flux, save_wan

#: Host memory a compiled pipeline holds besides what its units plan for: the pipeline object,
#: its tokenizers and scheduler, the components' meta models and the dry run's bookkeeping.
PIPELINE_OVERHEAD_BYTES = 8 * 2**20

CASES = {"flux": (FluxPipeline, save_flux, FLUX_CALL), "wan": (WanPipeline, save_wan, WAN_CALL)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny pipeline saved once, with its eager output."""
    out = {}
    for name, (cls, save, call) in CASES.items():
        root = save(tmp_path_factory.mktemp(name))
        with torch.no_grad():
            expected = output_of(eager_pipeline(cls, root)(**call, generator=generator()))
        out[name] = (cls, root, call, expected)
    # torch.export's one-time process state is not the pipeline's: pay it here.
    vramfx.compile(torch.nn.Linear(2, 2), budget="16MiB", device="cpu", example_args=(torch.ones(1, 2),), cache=False)
    return out


class _Reads:
    """Counts weight reads from any DiskMap."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("read_into", "__getitem__"):
            original = getattr(DiskMap, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(DiskMap, name, counted)


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_equals_eager_at_its_minimum_budget(name, saved, monkeypatch):
    cls, root, call, expected = saved[name]
    reads = _Reads(monkeypatch)
    release_freed_memory()
    # RssAnon from before the first compile through two generations, at the minimum budget (the
    # probe that finds it, a compile that fails, is counted too).
    with PeakMemory("cpu") as peak:
        with pytest.raises(vramfx.BudgetError, match="below the minimum .* for this pipeline") as info:
            compile_pipeline(cls, root, budget=1, device="cpu", example=call)
        assert reads.count == 0  # refused before any weight was read
        minimum = info.value.minimum_bytes
        pipe = compile_pipeline(cls, root, budget=minimum, device="cpu", example=call)
        assert reads.count == 0  # planned, nothing run yet
        for _ in range(2):
            assert torch.equal(output_of(pipe(**call, generator=generator())), expected)
    print(f"{name}: RssAnon growth {peak.growth_bytes} bytes, minimum budget {minimum} bytes")
    assert peak.growth_bytes <= minimum + PIPELINE_OVERHEAD_BYTES, (peak.growth_bytes, minimum)
    assert isinstance(pipe, cls) and isinstance(pipe.transformer, PipelineMember)
    rows = pipe.vramfx.report()
    assert {r["unit"] for r in rows} >= {"transformer", "vae.decode"}
    assert all(r["reserve_bytes"] < r["peak_bytes"] <= minimum for r in rows)  # the reserve is inside the plan
    assert max(r["streamed_bytes"] for r in rows) > 0  # at the minimum, something streams


@pytest.mark.parametrize("name", list(CASES))
def test_roomy_budget_keeps_components_across_generations(name, saved):
    cls, root, call, expected = saved[name]
    pipe = compile_pipeline(cls, root, budget="1GB", device="cpu")  # planned on the first call
    assert pipe.vramfx.report() == []
    assert torch.equal(output_of(pipe(**call, generator=generator())), expected)
    rows = {r["unit"]: r for r in pipe.vramfx.report()}
    transformer = rows["transformer"]
    assert transformer["calls"] == call["num_inference_steps"] * (2 if name == "wan" else 1)
    assert all(r["kept"] and r["streamed_bytes"] == 0 for r in rows.values())
    assert torch.equal(output_of(pipe(**call, generator=generator())), expected)


def test_a_new_call_shape_is_planned_before_it_runs(saved, monkeypatch):
    cls, root, call, _ = saved["flux"]
    pipe = compile_pipeline(cls, root, budget="1GB", device="cpu", example=call)
    bigger = dict(call, height=48, width=48)
    with torch.no_grad():
        expected = output_of(eager_pipeline(cls, root)(**bigger, generator=generator()))
    assert torch.equal(output_of(pipe(**bigger, generator=generator())), expected)
    assert len(pipe.vramfx.planned) == 2


def test_pipeline_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="has no model_index.json"):
        compile_pipeline(FluxPipeline, tmp_path, budget="1GB", device="cpu")


def test_vramfx_plan_shows_each_component_of_a_pipeline(saved, tmp_path, capsys):
    from vramfx.cli import EXIT_BUDGET, EXIT_OK, main

    _, root, call, _ = saved["flux"]
    target = tmp_path / "workload.py"
    target.write_text(
        "from diffusers import FluxPipeline\nfrom vramfx.workload import PipelineWorkload\n"
        f"def build():\n    return PipelineWorkload(FluxPipeline, {str(root)!r}, {dict(call)!r})\n"
    )
    assert main(["plan", f"{target}:build", "--budget", "1GB", "--device", "cpu"]) == EXIT_OK
    shown = capsys.readouterr().out
    for unit in ("text_encoder ", "text_encoder_2", "transformer", "vae.decode"):
        assert unit in shown
    assert "planned peak" in shown
    assert main(["plan", f"{target}:build", "--budget", "1MB", "--device", "cpu"]) == EXIT_BUDGET
    assert "below the minimum" in capsys.readouterr().err


def test_a_lora_loaded_into_a_compiled_pipeline_gives_eager_pipelines_output(tmp_path):
    pytest.importorskip("peft")
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = save_flux(tmp_path / "flux")
    eager = eager_pipeline(FluxPipeline, root)
    base = output_of(eager(**FLUX_CALL, generator=generator()))
    torch.manual_seed(3)
    donor = FluxTransformer2DModel.from_pretrained(root / "transformer")
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False),
                      adapter_name="x")
    lora = {"transformer." + k: v.clone() for k, v in get_peft_model_state_dict(donor, adapter_name="x").items()}
    eager.load_lora_weights(dict(lora), adapter_name="x")
    expected = output_of(eager(**FLUX_CALL, generator=generator()))
    assert not torch.equal(base, expected)

    pipe = compile_pipeline(FluxPipeline, root, budget="1GB", device="cpu")
    pipe.load_lora_weights(dict(lora), adapter_name="x")
    assert torch.equal(expected, output_of(pipe(**FLUX_CALL, generator=generator())))
