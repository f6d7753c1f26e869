"""Fake-quant inference: a run's pipeline with a plan applied, images out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from mpq.calib import calib_prompts
from mpq.ckpt import load_checkpoint
from mpq.errors import MpqError
from mpq.generate import generate, save_images, to_array
from mpq.metrics import image_mse
from mpq.models import denoiser_of, pipeline_in, torch_dtype
from mpq.plan import BitPlan, read_layer_list, read_plan, validate_plan
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


def build_plan(
    qm: QuantModel,
    bits: list[int],
    weight_bits: int | None = None,
    act_bits: int | None = None,
    weight_plan: str | Path | None = None,
    act_plan: str | Path | None = None,
    act_protect: str | Path | None = None,
    protect_weights: bool = False,
) -> BitPlan:
    """Plan files win over uniform bits; everything is validated against the model and checkpoint."""
    plan = BitPlan.uniform(qm.names, weight_bits, act_bits)
    if weight_plan:
        plan.weight = read_plan(weight_plan)
        validate_plan(plan.weight, qm.names, bits, str(weight_plan))
    if act_plan:
        plan.act = read_plan(act_plan)
        validate_plan(plan.act, qm.names, bits, str(act_plan))
    if act_protect:
        protected = read_layer_list(act_protect)
        validate_plan({n: bits[0] for n in protected}, qm.names, bits, str(act_protect))
        plan = plan.protect(protected, weights=protect_weights)
    for kind, mapping in (("weight", weight_bits), ("activation", act_bits)):
        if mapping is not None and mapping not in bits:
            raise MpqError(f"uniform {kind} bits {mapping} were not calibrated (checkpoint has {bits})")
    return plan


def run_infer(
    cfg: DictConfig,
    run: RunDir,
    plan_args: dict[str, Any],
    outdir: Path,
    num_images: int,
    prompts: list[str] | None = None,
    pipe: Any | None = None,
) -> dict[str, Any]:
    """Generate ``num_images`` with the plan into ``outdir``; MSE vs FP when the prompts are the calibration ones."""
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    plan = build_plan(qm, manifest["bits"], **plan_args, protect_weights=cfg.search.protect_weights)
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
            result["mse"] = float(np.mean(image_mse(to_array(images), to_array([Image.open(p) for p in refs]))))
    return result


def run_final(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    """Images with the selected plans (and act-protect list) into RUN/generated_images."""
    import shutil

    sel = run.root / "selection"
    plan_args = {
        "weight_plan": run.require("selection/final_weight.yaml", f"run `mpq select --base_path {run.root}` first"),
        "act_plan": run.require("selection/final_act.yaml", f"run `mpq select --base_path {run.root}` first"),
        "act_protect": sel / "final_act_protect.pt" if (sel / "final_act_protect.pt").is_file() else None,
    }
    outdir = run.root / "generated_images"
    shutil.rmtree(outdir, ignore_errors=True)
    return run_infer(cfg, run, plan_args, outdir, cfg.infer.num_images, pipe=pipe)
