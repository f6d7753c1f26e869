"""The final stage and ``mpq infer``'s work: a run's pipeline with a plan applied (fake-quant), images out."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from mpq.calibration.checkpoint import manifest_formats, quantized_pipeline
from mpq.calibration.record import calib_prompts, read_meta, reference_mismatch
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
    mismatch: list[str] = []
    if prompts:
        chosen = [prompts[i % len(prompts)] for i in range(num_images)]
        seeds = [cfg.sampling.seed + i for i in range(num_images)]
    else:
        chosen, seeds = calib_prompts(run, num_images, "the number of images (--num_imgs / infer.num_images)")
        mismatch = reference_mismatch(read_meta(run), cfg)
    try:
        images: list[Image.Image] = generate(pipe, chosen, seeds, cfg, desc="generating")
    finally:
        qm.set_fp()
    paths = save_images(images, outdir)
    result: dict[str, Any] = {"images": paths, "outdir": outdir, "plan": plan, "mse": None}
    if mismatch:
        print(
            f"mpq: note: no MSE against the FP images: they were made with other sampling ({'; '.join(mismatch)}); "
            f"`mpq calib --base_path {run.root} --force` with these settings re-makes them",
            file=sys.stderr,
        )
    elif not prompts:
        refs = [run.fp_image(i) for i in range(len(images))]
        if all(p.is_file() for p in refs):
            result["mse"] = float(np.mean(image_mse(to_array(images), to_array(load_images(refs)))))
    return result


def run_final(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    """The final stage: images with the selected plan into RUN/generated_images."""
    plan = final_plan(run)
    shutil.rmtree(run.generated_images, ignore_errors=True)
    return run_infer(cfg, run, plan, run.generated_images, cfg.infer.num_images, pipe=pipe)
