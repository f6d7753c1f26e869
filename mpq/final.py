"""The final stage and ``mpq infer``: a run's pipeline with a plan applied (fake-quant), images out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from mpq.calibration.checkpoint import manifest_formats, quantized_pipeline, read_manifest
from mpq.calibration.record import calib_prompts
from mpq.images import generate, load_images, save_images, to_array
from mpq.metrics import image_mse
from mpq.plan import BitPlan, final_plan, plan_from_args
from mpq.runner.rundir import RunDir


def run_infer(
    cfg: DictConfig,
    run: RunDir,
    plan: BitPlan | None,
    outdir: Path,
    num_images: int,
    prompts: list[str] | None = None,
    pipe: Any | None = None,
) -> dict[str, Any]:
    """Generate ``num_images`` with ``plan`` into ``outdir`` (``None``: uniform ``infer.weight_bits`` /
    ``infer.act_bits``);
    MSE vs FP when the prompts are the calibration ones."""
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    if plan is None:
        plan = plan_from_args(
            qm.names, manifest["bits"], cfg.infer.weight_bits, cfg.infer.act_bits, formats=manifest_formats(manifest)
        )
    qm.apply(plan)
    if prompts:
        chosen = [prompts[i % len(prompts)] for i in range(num_images)]
        seeds = [cfg.sampling.seed + i for i in range(num_images)]
    else:
        all_prompts, all_seeds = calib_prompts(run)
        chosen, seeds = all_prompts[:num_images], all_seeds[:num_images]
    try:
        images: list[Image.Image] = generate(pipe, chosen, seeds, cfg, desc="generating")
    finally:
        qm.set_fp()
    paths = save_images(images, outdir)
    result: dict[str, Any] = {"images": paths, "outdir": outdir, "plan": plan, "mse": None}
    if not prompts:
        refs = [run.fp_images / f"{i:04d}.png" for i in range(len(images))]
        if all(p.is_file() for p in refs):
            result["mse"] = float(np.mean(image_mse(to_array(images), to_array(load_images(refs)))))
    return result


def run_final(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    """The final stage: images with the selected plan into RUN/generated_images."""
    plan = final_plan(run)
    shutil.rmtree(run.generated_images, ignore_errors=True)
    return run_infer(cfg, run, plan, run.generated_images, cfg.infer.num_images, pipe=pipe)


def plan_from_options(cfg: DictConfig, run: RunDir, options: dict[str, Any] | None) -> BitPlan | None:
    """The plan given on the command line (``mpq infer``, ``mpq export``: uniform bits or MixDQ files), validated
    against the run's checkpoint; ``None`` when no plan option is given (``options`` None)."""
    if options is None:
        return None
    manifest = read_manifest(run.require(run.ckpt, f"run `mpq ptq --base_path {run.root}` first"))
    return plan_from_args(
        [e["name"] for e in manifest["layers"]],
        manifest["bits"],
        **options,
        protect_weights=cfg.search.protect_weights,
        formats=manifest_formats(manifest),
    )
