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

SMALL = ["sampling.steps=1", "calib.num_samples=8", "sampling.batch_size=4", "calib.batch_size=8", "model.device=cpu"]


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
    "sampling.steps=1",
    "calib.num_samples=8",
    "sampling.batch_size=4",
    "calib.batch_size=8",
    "model.device=cpu",
    "sensitivity.num_images=4",
    "sensitivity.batch_size=8",
    "select.num_images=4",
    "infer.num_images=4",
    "search.sweep_steps=2",
    "search.sweep_density=1.5",
    "search.weight.k_num=2",
    "search.act.k_num=2",
    "eval.num_images=8",
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
