"""``mpq export``: a run's plan (the selected one by default) written in one of the export formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.errors import MpqError
from mpq.models import DTYPES
from mpq.plan import BitPlan, final_plan
from mpq.runner.rundir import RunDir

FORMATS = ("mpq", "torchao", "encodings")


def export_plan(
    cfg: DictConfig, run: RunDir, out: str | Path, fmt: str = "mpq", plan: BitPlan | None = None, fp_dtype: str = "fp16"
) -> dict[str, Any]:
    """Export ``plan`` (default: the selected plan) in ``fmt``."""
    from mpq.export.mpq_format import export_mpq

    if fmt not in FORMATS:
        raise MpqError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fp_dtype not in DTYPES:
        raise MpqError(f"unknown --fp-dtype {fp_dtype!r}; choose one of {', '.join(DTYPES)}")
    if Path(out).resolve() == run.root.resolve():
        raise MpqError("--out must be a new folder, not the run directory")
    pipe, qm, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
    plan = plan if plan is not None else final_plan(run)
    plan.validate(qm.names, qm.bits)
    if fmt == "mpq":
        return export_mpq(pipe, qm, plan, out, cfg, DTYPES[fp_dtype])
    if fmt == "torchao":
        from mpq.export.torchao_format import export_torchao

        return export_torchao(qm, plan, out, str(cfg.model.id))
    from mpq.export.encodings import export_encodings

    return export_encodings(qm, plan, out)
