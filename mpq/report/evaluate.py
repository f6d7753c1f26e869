"""Evaluation: images of several plans on the evaluation prompts, scored against FP.

Scores per plan: MSE / SSIM / PSNR against the FP images of the same prompts
and seeds, the weight bytes, and, for prompts of the embedded model's shapes
grammar, prompt adherence (:mod:`mpq.shapes.judge`).

The evaluation prompts are ``eval.prompts_file`` (the embedded model:
``builtin:shapes-heldout``, scenes it never saw in training), or the
calibration prompts when it is null; then their FP images are the run's
``fp_images/``, otherwise FP images are generated here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from mpq.calibration.record import calib_prompts, fp_image_paths
from mpq.images import PromptEmbeddings, generate, load_images, save_images, to_array
from mpq.metrics import image_mse, image_psnr, image_ssim
from mpq.plan import BitPlan
from mpq.prompts import cycle, read_prompts
from mpq.quant.model import QuantModel
from mpq.runner.rundir import RunDir
from mpq.shapes.judge import adherence


def score_images(
    images: Sequence[Image.Image], refs: np.ndarray, prompts: Sequence[str] | None = None
) -> dict[str, Any]:
    """Mean MSE, SSIM, PSNR against ``refs``; with ``prompts``, adherence too (``None`` outside the shapes grammar)."""
    arr = to_array(images)
    out: dict[str, Any] = {
        "mse": float(image_mse(arr, refs).mean()),
        "ssim": float(image_ssim(arr, refs).mean()),
        "psnr": float(image_psnr(arr, refs).mean()),
    }
    if prompts is not None:
        out["adherence"] = adherence(images, prompts)
    return out


@dataclass
class EvalSet:
    prompts: list[str]
    seeds: list[int]
    fp_images: list[Image.Image]

    @property
    def refs(self) -> np.ndarray:
        return to_array(self.fp_images)


def calibration_set(run: RunDir, n: int, asked: str) -> EvalSet:
    """The first ``n`` calibration prompts, their seeds and the run's FP images of them (selection, the report);
    ``asked``: the setting that wants ``n`` (named in the note when the run has fewer)."""
    prompts, seeds = calib_prompts(run, n, asked)
    n = len(prompts)
    fix = f"re-run `mpq calib --force --base_path {run.root}`"
    return EvalSet(prompts[:n], seeds[:n], load_images(fp_image_paths(run, n), fix))


def eval_set(cfg: DictConfig, run: RunDir, pipe: Any, folder: Path) -> EvalSet:
    """The evaluation prompts, seeds and FP images (generated into ``folder`` unless they are the calibration ones)."""
    if cfg.eval.prompts_file is None:
        return calibration_set(run, cfg.eval.num_images, "eval.num_images")
    listed = read_prompts(cfg.eval.prompts_file, "eval.prompts_file")
    if cfg.eval.num_images > len(listed):
        print(
            f"mpq: note: eval.num_images = {cfg.eval.num_images}, but {cfg.eval.prompts_file} lists {len(listed)} "
            f"prompts: evaluating on {len(listed)}",
            file=sys.stderr,
        )
    prompts, seeds = cycle(listed, min(cfg.eval.num_images, len(listed)), cfg.sampling.seed)
    images = generate(pipe, prompts, seeds, cfg, desc="eval: FP images")
    save_images(images, folder)
    return EvalSet(prompts, seeds, images)


def evaluate_plans(
    cfg: DictConfig,
    pipe: Any,
    qm: QuantModel,
    plans: dict[str, BitPlan],
    data: EvalSet,
    folder: Path | None,
    with_fp: bool = True,
) -> dict[str, dict[str, Any]]:
    """{label: scores} for each plan (and FP as ``"FP"`` with ``with_fp``); images go to ``folder/<label>/`` (None:
    not kept)."""
    results: dict[str, dict[str, Any]] = (
        {"FP": score_images(data.fp_images, data.refs, data.prompts)} if with_fp else {}
    )
    text = PromptEmbeddings(pipe, cfg)  # every plan draws the same prompts: encode them once
    try:
        for label, plan in plans.items():
            qm.apply(plan)
            images = generate(pipe, data.prompts, data.seeds, cfg, desc=f"eval: {label}", text=text)
            if folder is not None:
                save_images(images, folder / slug(label))
            results[label] = score_images(images, data.refs, data.prompts)
    finally:
        qm.set_fp()
    return results


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
