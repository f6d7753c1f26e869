"""The stages of a run and the runner that skips what is up to date."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from mpq.rundir import RunDir, Stage

CALIB = Stage("calib", ("model.id", "model.variant", "model.dtype", "sampling", "calib.num_samples", "calib.prompts_file"), (), ("calib/meta.json",))
PTQ = Stage("ptq", ("model.id", "model.variant", "sensitivity.dtype", "quant", "calib.batch_size"), ("calib",), ("ckpt.safetensors",))
SENSITIVITY = Stage("sensitivity", ("model.id", "sensitivity.dtype", "sensitivity.ssim", "sensitivity.num_images", "sensitivity.batch_size",
                                    "groups", "quant"),
                    ("ptq",), tuple(f"sensitivity/{k}_{m}.yaml" for k in ("weight", "act") for m in ("sqnr", "ssim")))
SEARCH = Stage("search", ("model.id", "search", "quant.bits", "quant.weight.granularity", "groups", "sampling.resolution"),
               ("sensitivity",), ("candidates/pareto.csv", "report/pareto.png"))

SELECT = Stage("select", ("model.id", "select", "sampling"), ("search",), ("selection/final_weight.yaml", "selection/final_act.yaml"))
FINAL = Stage("final", ("model.id", "infer.num_images", "sampling"), ("select",), ("generated_images",))
REPORT = Stage("report", ("model.id", "select.num_images", "sampling"), ("sensitivity", "search", "select", "final"), ("report/index.html",))


def run_stage(stage: Stage, cfg: DictConfig, run: RunDir, fn: Callable[[], Any], force: bool = False, log: Callable[[str], None] = print) -> Any:
    """Run ``fn`` unless the stage is up to date; stamp it when done."""
    if not force and run.is_fresh(stage, cfg):
        log(f"[{stage.name}] up to date, skipped ({run.root})")
        return None
    log(f"[{stage.name}] running ...")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    run.mark_done(stage, cfg, seconds)
    log(f"[{stage.name}] done in {seconds:.1f} s")
    return result
