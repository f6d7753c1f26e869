"""``mpq export``: a run's plan (the selected one by default) written in one of the export formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.errors import MpqError
from mpq.export.folder import check_target, export_folder
from mpq.models import denoiser_name
from mpq.plan import BitPlan, final_plan
from mpq.quant.model import weights_sample
from mpq.runner.choices import DTYPES
from mpq.runner.rundir import RunDir

FORMATS = ("mpq", "torchao", "encodings", "sdnq", "gguf")


def export_plan(
    cfg: DictConfig,
    run: RunDir,
    out: str | Path,
    fmt: str = "mpq",
    plan: BitPlan | None = None,
    fp_dtype: str = "fp16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``plan`` (default: the selected plan) in ``fmt`` into ``out`` (see :mod:`mpq.export.folder` for what
    ``out`` may be)."""
    from mpq.export.mpq_format import export_mpq

    if fmt not in FORMATS:
        raise MpqError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fp_dtype not in DTYPES:
        raise MpqError(f"unknown --fp-dtype {fp_dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    check_target(out, fmt, run.root, overwrite)  # before the pipeline loads
    if fmt in ("sdnq", "gguf"):
        return _export_runtime(cfg, run, out, fmt, plan, fp_dtype, overwrite)
    pipe, qm, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
    plan = plan if plan is not None else final_plan(run)
    plan.validate(qm.names, qm.bits, formats=qm.formats)
    source = {
        "model_id": str(cfg.model.id),
        "fingerprint": qm.fingerprint,
        "weights_sample": weights_sample(qm.denoiser),
    }
    with export_folder(out, fmt, run.root, overwrite, source) as folder:
        if fmt == "mpq":
            info = export_mpq(pipe, qm, plan, folder, cfg, DTYPES[fp_dtype], denoiser_name(pipe.components))
        elif fmt == "torchao":
            from mpq.export.torchao_format import export_torchao

            info = export_torchao(qm, plan, folder, str(cfg.model.id))
        else:
            from mpq.export.encodings import export_encodings

            info = export_encodings(qm, plan, folder, denoiser_name(pipe.components))
    return {**info, "out": out}


def _export_runtime(
    cfg: DictConfig, run: RunDir, out: Path, fmt: str, plan: BitPlan | None, fp_dtype: str, overwrite: bool
) -> dict[str, Any]:
    """A runtime's own files (SDNQ's pipeline folder, :mod:`mpq.export.sdnq_format`; a GGUF file,
    :mod:`mpq.export.gguf_format`): the plan is checked against the checkpoint's layers and formats without loading
    the quantized model; the runtime's package quantizes a fresh FP copy."""
    from mpq.calibration.checkpoint import manifest_formats, read_manifest, run_layers
    from mpq.cost import CostModel

    manifest = read_manifest(run.require(run.ckpt, f"run `mpq ptq --base_path {run.root}` first"))
    plan = plan if plan is not None else final_plan(run)
    plan.validate([e["name"] for e in manifest["layers"]], manifest["bits"], formats=manifest_formats(manifest))
    cost = CostModel.from_config(cfg)
    priced = sum(
        cost.weight_bytes(info, plan.weight[info.name]) for info in run_layers(cfg, run) if info.name in plan.weight
    )
    with export_folder(out, fmt, run.root, overwrite, {"model_id": str(cfg.model.id)}) as folder:
        if fmt == "sdnq":
            from mpq.export.sdnq_format import export_sdnq

            info = export_sdnq(cfg, plan, folder, DTYPES[fp_dtype])
        else:
            from mpq.export.gguf_format import export_gguf

            info = export_gguf(cfg, plan, folder, DTYPES[fp_dtype], cost.fp_bytes)
    return {**info, "priced_bytes": priced, "out": out}
