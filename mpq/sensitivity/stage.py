"""The sensitivity stage: ``sensitivity/{weight,act}_{sqnr,ssim}.yaml`` (MixDQ's format) and the float floor.

* SQNR (dB) of the denoiser output against this pass's FP output, over the
  whole calibration set: every layer (MixDQ's SQNR file covers all layers;
  the search uses it for the quality group).
* SSIM of the generated image against the FP image (same prompt and seed),
  averaged over ``sensitivity.num_images`` images: the content group.

Each file is one :class:`~mpq.sensitivity.job.SensitivityJob`: exact
(:mod:`mpq.sensitivity.exact`; ``method=fast`` computes ``naive``'s numbers
with the FP prefix cache) or estimated (:mod:`mpq.sensitivity.estimated`:
local, fisher, hybrid), resumable and shardable over torchrun ranks (items:
layers, :func:`~mpq.runner.sharded.run_sharded`). A file finished with the
same settings (its signature: the stage's keys, :data:`mpq.runner.specs.SENSITIVITY`)
is read back.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mpq.calibration.checkpoint import quantized_pipeline, weight_candidates
from mpq.errors import MpqError
from mpq.models import torch_dtype
from mpq.runner import distributed
from mpq.runner.choices import ESTIMATORS, KINDS, METHODS, METRICS
from mpq.runner.rundir import RunDir
from mpq.search.mixdq_files import write_sensitivity
from mpq.sensitivity.estimated import estimated_file
from mpq.sensitivity.exact import exact_file, float_floor, inseparable, share_bits
from mpq.sensitivity.job import SensitivityJob, layers_to_score, read_back
from mpq.sensitivity.scorers import SCORERS, Sqnr

__all__ = [
    "Sqnr",
    "compute_sensitivity",
    "float_floor",
    "inseparable",
    "layers_to_score",
    "read_back",
    "run_sensitivity",
    "share_bits",
]


def compute_sensitivity(
    cfg: DictConfig,
    run: RunDir,
    kind: str,
    metric: str,
    method: str | None = None,
    pipe: Any | None = None,
    show: bool = True,
    force: bool = False,
    write: bool = True,
) -> dict[str, list[float]]:
    """``sensitivity/<kind>_<metric>.yaml``: {layer: [metric at each candidate bit]}. Resumable (partial files);
    a file already finished with the same settings is read back, not computed again, unless ``force``. With
    ``write=False`` the numbers are computed and returned only (no file read or written: a look, a benchmark)."""
    if kind not in KINDS or metric not in SCORERS:
        raise MpqError(
            f"sensitivity type must be {'|'.join(KINDS)} and metric {'|'.join(SCORERS)} (got {kind}, {metric})"
        )
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe, dtype=torch_dtype(cfg.sensitivity.dtype))
    bits: list[Any] = weight_candidates(manifest) if kind == "weight" else list(manifest["bits"])
    out = run.sensitivity_file(kind, metric)
    names = layers_to_score(qm.names, cfg, metric, manifest.get("family", "unet"))
    if not names:  # a sensitivity.layers subset without content layers
        if distributed.current().is_main and write:
            print(
                f"[sensitivity] {kind} {metric}: skipped, sensitivity.layers={list(cfg.sensitivity.layers)} selects no "
                "content layer "
                f"({out} left empty; the search needs every layer: leave sensitivity.layers empty for a real run)",
                flush=True,
            )
            write_sensitivity(out, {}, bits)
        return {}
    method = method or cfg.sensitivity.method
    if method not in METHODS:
        raise MpqError(f"unknown sensitivity method {method!r}; choose from {', '.join(METHODS)}")
    job = SensitivityJob(cfg, run, kind, metric, method, pipe, qm, bits, names, show, write, force)
    if method in ESTIMATORS or (method == "hybrid" and metric == "sqnr"):
        return estimated_file(job)
    return exact_file(job, fast=method != "naive")  # hybrid: the content group's SSIM exactly, by the fast path


def run_sensitivity(
    cfg: DictConfig,
    run: RunDir,
    kinds: tuple[str, ...] = KINDS,
    metrics: tuple[str, ...] = METRICS,
    method: str | None = None,
    pipe: Any | None = None,
    show: bool = True,
    force: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """The stage: every kind x metric file (files finished with these settings by an interrupted run are kept, unless
    ``force``)."""
    out = {}
    for kind in kinds:
        for metric in metrics:
            out[f"{kind}_{metric}"] = values = compute_sensitivity(
                cfg, run, kind, metric, method, pipe, show, force=force
            )
            if distributed.current().is_main:
                print(
                    f"[sensitivity] {kind} {metric}: {len(values)} layers -> {run.sensitivity_file(kind, metric)}",
                    flush=True,
                )
    return out
