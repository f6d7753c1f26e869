"""Fake-quant inference: a run's pipeline with a plan applied, images out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from mpq.calib import calib_prompts
from mpq.ckpt import load_checkpoint
from mpq.errors import MpqError
from mpq.generate import generate, load_images, save_images, to_array
from mpq.metrics import image_mse
from mpq.models import denoiser_of, pipeline_in, torch_dtype
from mpq.plan import BitPlan
from mpq.quant.model import QuantModel
from mpq.rundir import RunDir


def quantized_pipeline(cfg: DictConfig, run: RunDir, pipe: Any | None = None, dtype: torch.dtype | None = None) -> tuple[Any, QuantModel, dict[str, Any]]:
    """The run's pipeline (in ``dtype``, default ``model.dtype``) with its denoiser wrapped and the checkpoint
    loaded (FP until a plan is applied); ``pipe`` is reused when it computes in that dtype."""
    run.require("ckpt.safetensors", f"run `mpq ptq --base_path {run.root}` first")
    pipe = pipeline_in(cfg, dtype or torch_dtype(cfg.model.dtype), pipe)
    qm = QuantModel(denoiser_of(pipe))
    manifest = load_checkpoint(run.ckpt, qm)
    return pipe, qm, manifest


def plan_from_args(qm: QuantModel, bits: list[int], weight_bits: int | None = None, act_bits: int | None = None,
                   weight_plan: str | Path | None = None, act_plan: str | Path | None = None, act_protect: str | Path | None = None,
                   protect_weights: bool = False) -> BitPlan:
    """Plan files win over uniform bits; everything is validated against the model and checkpoint."""
    for kind, b in (("weight", weight_bits), ("activation", act_bits)):
        if b is not None and b not in bits:
            raise MpqError(f"uniform {kind} bits {b} were not calibrated (checkpoint has {bits})")
    uniform = BitPlan.uniform(qm.names, weight_bits, act_bits)
    files = BitPlan.load(weight_plan, act_plan)
    plan = BitPlan(files.weight if weight_plan else uniform.weight, files.act if act_plan else uniform.act)
    if act_protect:
        plan = plan.protect(BitPlan.load(protect=act_protect).protected, protect_weights)
    return plan.validate(qm.names, bits, str(weight_plan or act_plan or act_protect or "plan"))


def run_infer(cfg: DictConfig, run: RunDir, plan: BitPlan | dict[str, Any], outdir: Path, num_images: int,
              prompts: list[str] | None = None, pipe: Any | None = None) -> dict[str, Any]:
    """Generate ``num_images`` with ``plan`` (a BitPlan, or :func:`plan_from_args` arguments) into ``outdir``;
    MSE vs FP when the prompts are the calibration ones."""
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    if isinstance(plan, BitPlan):
        plan.validate(qm.names, manifest["bits"])
    else:
        plan = plan_from_args(qm, manifest["bits"], **plan, protect_weights=cfg.search.protect_weights)  # validated there
    qm.apply(plan.weight, plan.act)
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
    """Images with the selected plan (and its act-protect list) into RUN/generated_images."""
    from mpq.selection import final_plan

    plan = final_plan(run, cfg.search.protect_weights)
    outdir = run.root / "generated_images"
    shutil.rmtree(outdir, ignore_errors=True)
    return run_infer(cfg, run, plan, outdir, cfg.infer.num_images, pipe=pipe)
