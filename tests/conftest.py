"""Shared fixtures: one small calibrated run of the embedded tiny model per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpq.calibration.ptq import run_ptq
from mpq.calibration.record import CalibData, run_calibration
from mpq.metrics import SqnrAccumulator
from mpq.models import denoiser_of, load_pipeline
from mpq.quant.model import QuantModel
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir

# MixDQ's three widths (the trained configs search every width from 2 to 8: twice the sensitivity time)
THREE_WIDTHS = [
    "quant.bits=[2,4,8]",
    "search.weight.bits_content=[2,4,8]",
    "search.weight.bits_quality=[4,8]",
    "search.weight.also=[]",
]
# the tiny model at small sizes: one sampling step, 8 calibration samples, CPU
TINY_SIZES = [
    "sampling.steps=1",
    "calib.num_samples=8",
    "sampling.batch_size=4",
    "calib.batch_size=8",
    "model.device=cpu",
]
SMALL = [*TINY_SIZES, *THREE_WIDTHS]


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config("tiny-sdxl", SMALL)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_cfg) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.save_config(tiny_cfg)
    pipe = load_pipeline(tiny_cfg)
    run_calibration(tiny_cfg, run, pipe)
    run_ptq(tiny_cfg, run, pipe)
    return run


def fp_outputs(qm: QuantModel, calib: CalibData) -> list[torch.Tensor]:
    with torch.no_grad():
        return [qm(**kwargs, return_dict=False)[0] for kwargs, _ in calib.batches(8, torch.device("cpu"))]


def denoiser_sqnr(qm: QuantModel, calib: CalibData, refs: list[torch.Tensor]) -> float:
    acc = SqnrAccumulator()
    with torch.no_grad():
        for (kwargs, _), ref in zip(calib.batches(8, torch.device("cpu")), refs):
            acc.update(qm(**kwargs, return_dict=False)[0], ref)
    return acc.value


@pytest.fixture()
def fresh_qm(tiny_cfg):
    """A freshly loaded pipeline and its wrapped denoiser (FP)."""
    pipe = load_pipeline(tiny_cfg)
    return pipe, QuantModel(denoiser_of(pipe))


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# the whole flow once per session, with small sizes: shared by the end-to-end and artifact tests
FULL_SMALL = [
    *TINY_SIZES,
    "sensitivity.num_images=4",
    "sensitivity.batch_size=8",
    "select.num_images=4",
    "infer.num_images=4",
    "search.sweep_steps=2",
    "search.sweep_density=1.5",
    "search.weight.k_num=2",
    "search.act.k_num=2",
    "eval.num_images=8",
    *THREE_WIDTHS,
]


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> tuple[RunDir, str]:
    """A finished ``mpq run`` directory and what the command printed."""
    import contextlib
    import io

    from mpq.commands.main import main

    run = RunDir(tmp_path_factory.mktemp("full") / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--config", "tiny-sdxl", "--outdir", str(run.root), *FULL_SMALL]) == 0
    return run, out.getvalue()


# ----------------------------------------------------------------------------- an SDNQ export, loaded without mpq
SDNQ_PROMPTS = ["a small red circle at the top left on a white background", "a large blue square in the center"]
_DRAW = """
pipe.set_progress_bar_config(disable=True)
prompts = call.pop("prompts")
images = [
    pipe(p, generator=torch.Generator().manual_seed(i), output_type="pt", **call).images for i, p in enumerate(prompts)
]
torch.save({"images": torch.cat(images), "mpq_imported": "mpq" in sys.modules, "quantized": quantized(den)}, out)
"""
_SDNQ_LOAD = (
    """
import json, sys, torch
from diffusers import DiffusionPipeline
folder, call, absent, out, comp = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), *sys.argv[4:6]
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **{k: None for k in absent})
den = getattr(pipe, comp)
def quantized(den):
    return sum(hasattr(m, "sdnq_dequantizer") for m in den.modules())
"""
    + _DRAW
)
# the GGUF file through diffusers' single-file loader: the layout converted by diffusers' own converter
_GGUF_LOAD = (
    """
import json, pathlib, sys, torch, diffusers
from diffusers import DiffusionPipeline, GGUFQuantizationConfig
folder, call, absent, out, comp = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), *sys.argv[4:6]
index = json.loads((pathlib.Path(folder) / "model_index.json").read_text())
(file,) = pathlib.Path(folder).glob("*.gguf")
den = getattr(diffusers, index[comp][1]).from_single_file(
    str(file), config=folder, subfolder=comp, torch_dtype=torch.float32,
    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
)
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **{comp: den}, **{k: None for k in absent})
def quantized(den):
    return sum(type(p).__name__ == "GGUFParameter" for p in den.parameters())
"""
    + _DRAW
)
LOADERS = {"sdnq": _SDNQ_LOAD, "gguf": _GGUF_LOAD}


def runtime_draws_the_simulation(cfg, run, folder, plan, tmp_path, runtime: str = "sdnq") -> tuple[float, float, int]:
    """Draw the prompts with mpq's fake-quant of ``plan``'s weights (the run's pipeline) and, in a fresh process
    that never imports mpq, with the ``runtime``'s export ``folder`` through stock diffusers; returns (max abs
    difference of the two, max abs difference of the simulation from FP, the quantized modules or parameters the
    runtime loaded)."""
    import json
    import subprocess
    import sys

    from mpq.calibration.checkpoint import quantized_pipeline
    from mpq.images import call_kwargs
    from mpq.models import denoiser_name
    from mpq.models.loader import absent_components
    from mpq.plan import BitPlan

    pipe, qm, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = call_kwargs(pipe, cfg)  # as mpq calls each family

    def draw() -> torch.Tensor:
        return torch.cat(
            [
                pipe(p, generator=torch.Generator().manual_seed(i), output_type="pt", **call).images
                for i, p in enumerate(SDNQ_PROMPTS)
            ]
        )

    qm.set_fp()
    fp = draw()
    qm.apply(BitPlan(plan.weight))
    simulated = draw()
    qm.set_fp()
    out = tmp_path / f"{runtime}_images.pt"
    absent = sorted(absent_components(str(folder)))
    args = [json.dumps({**call, "prompts": SDNQ_PROMPTS}), json.dumps(absent), str(out), denoiser_name(pipe.components)]
    res = subprocess.run(
        [sys.executable, "-c", LOADERS[runtime], str(folder), *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = torch.load(out, weights_only=True)
    assert not loaded["mpq_imported"]
    diff = float((loaded["images"] - simulated).abs().max())
    return diff, float((simulated - fp).abs().max()), int(loaded["quantized"])


def sdnq_draws_the_simulation(cfg, run, folder, plan, tmp_path) -> tuple[float, float]:
    diff, effect, layers = runtime_draws_the_simulation(cfg, run, folder, plan, tmp_path, "sdnq")
    assert layers == len(plan.weight)
    return diff, effect
