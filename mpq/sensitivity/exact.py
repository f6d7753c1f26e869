"""The exact sensitivity metrics: each layer quantized alone, the denoiser (SQNR) or the pipeline (SSIM) run at each
candidate bit (``fast``: the FP prefix cache, the same numbers as ``naive``'s full runs).

:func:`exact_file` makes ``sensitivity/<kind>_<metric>.yaml`` (and, SQNR, the float floor);
:func:`exact_subset` the exact numbers of hybrid's uncertain layers. Both are resumable and sharded by layer
through :func:`mpq.runner.sharded.run_sharded`; the scoring itself is :mod:`mpq.sensitivity.loop`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.calibration.record import CalibData
from mpq.errors import MpqError
from mpq.families import Family, family_of
from mpq.metrics import sqnr
from mpq.runner.files import read_json, write_json
from mpq.runner.progress import progress
from mpq.runner.sharded import ShardedWork, run_sharded
from mpq.search.mixdq_files import read_sensitivity, write_sensitivity
from mpq.sensitivity.costs import layer_costs
from mpq.sensitivity.job import SensitivityJob, read_back
from mpq.sensitivity.loop import LoopOptions, score_layers
from mpq.sensitivity.scorers import Scorer, Sqnr, make_scorer


def share_bits(setting: str, metric: str, family: Family, guidance_scale: float) -> bool:
    """Whether ``metric`` runs all candidate bits of a layer in one tiled pass. Never where the copies would not
    be contiguous batch chunks: SSIM under classifier-free guidance (the pipeline concatenates all negative rows,
    then all positive ones), and a family with shared inputs (Flux's token positions, and what the FP prefix cache
    records from them, are not batch-major)."""
    if family.shared_inputs or (metric == "ssim" and family.doubles_batch(guidance_scale)):
        return False
    if setting == "auto":
        return metric == "ssim"
    return setting == "always"


def loop_options(job: SensitivityJob, fast: bool) -> LoopOptions:
    """How the loop runs this job's metric: the prefix cache (``fast``), bits in one pass, the cache's budget."""
    cfg = job.cfg
    share = share_bits(cfg.sensitivity.share_bits, job.metric, family_of(job.qm.denoiser), cfg.sampling.guidance_scale)
    return LoopOptions(fast, fast and share, cfg.sensitivity.cache_budget_mb * 2**20)


def how(opts: LoopOptions) -> dict[str, Any]:
    """What an exact file's numbers depend on of the variant keys: the path and whether bits share a pass (not
    the estimator, nor hybrid's fraction: hybrid's SSIM file is the fast path's)."""
    return {"method": "fast" if opts.fast else "naive", "share_bits": opts.share}


def exact_file(job: SensitivityJob, fast: bool) -> dict[str, list[float]]:
    """``sensitivity/<kind>_<metric>.yaml`` by the exact metric: {layer: [metric at each bit]} (as computed; the file
    holds them rounded, :func:`read_back`)."""
    opts = loop_options(job, fast)
    work = job.work(job.out, job.signature(job.names, **how(opts)), job.names)
    scorer = _lazy_scorer(job, fast)
    return run_sharded(
        work,
        job.out,
        compute=lambda: _score(job, work, scorer(), opts),
        result=lambda merged: {n: merged[n] for n in job.names},
        write=lambda values: _write(job, values, scorer(), work.report),
        read=job.read_finished,
        force=job.force,
        costs=lambda: layer_costs(job.qm, CalibData.open(job.run), job.names, job.metric, fast, len(job.bits)),
        resumed=lambda saved: _resuming(job, saved, scorer(), work),
        label=job.label,
        unit="layers",
    )


def exact_subset(job: SensitivityJob, names: list[str]) -> dict[str, list[float]]:
    """The exact metric (fast path) of ``names`` only, as the files hold them: the numbers the exact file holds for
    them. Kept as ``sensitivity/estimate/<kind>_<metric>.exact.yaml``."""
    if not names:
        return {}
    path = job.run.exact_subset_file(job.kind, job.metric)
    opts = loop_options(job, True)
    work = job.work(path, job.signature(names, **how(opts)), names)
    scorer = _lazy_scorer(job, True)
    return run_sharded(
        work,
        path,
        compute=lambda: _score(job, work, scorer(), opts),
        result=lambda merged: {n: read_back(merged[n]) for n in names},
        write=lambda values: write_sensitivity(path, values, job.bits),
        read=lambda: read_sensitivity(path, job.bits),
        force=job.force,
        costs=lambda: layer_costs(job.qm, CalibData.open(job.run), names, job.metric, True, len(job.bits)),
        resumed=lambda saved: _resuming(job, saved, scorer(), work),
        label=f"{job.label} (hybrid, exact)",
        unit="layers",
    )


def _lazy_scorer(job: SensitivityJob, fast: bool) -> Callable[[], Scorer]:
    """The job's scorer, made on first use (not at all for a file that is read back)."""
    return functools.cache(lambda: make_scorer(job.metric, job.pipe, job.qm, job.cfg, job.run, fast))


def _resuming(job: SensitivityJob, saved: dict[str, Any], scorer: Scorer, work: ShardedWork) -> str | None:
    done = sum(len(s["batches"]) for s in saved.values())
    if not done:
        return None
    total = len(scorer.batches) * len(work.items)
    return f"{job.label}: resuming, {done} of {total} layer-batch items already done"


def _score(job: SensitivityJob, work: ShardedWork, scorer: Scorer, opts: LoopOptions) -> dict[str, list[float]]:
    """This rank's layers scored, continuing from the saved state: the progress bar and the saving around the
    loop."""
    bar = progress(
        total=len(scorer.batches) * len(work.mine),
        initial=sum(len(s["batches"]) for s in work.state.values()),
        unit="layer",
        disable=not job.show,
        desc=f"{work.d.tag()}sensitivity {job.kind} {job.metric} ({'fast' if opts.fast else 'naive'})",
    )

    def after_layer(name: str, n: int) -> None:
        bar.update(n)
        work.save()

    try:
        return score_layers(job.qm, scorer, work.mine, job.bits, job.kind, opts, work.state, after_layer)
    finally:
        bar.close()


def _write(
    job: SensitivityJob, result: dict[str, list[float]], scorer: Scorer, report: list[dict[str, float]] | None
) -> None:
    """Rank 0: the MixDQ-format file (and the formats' scores beside it), the float floor (SQNR), the ranks' load
    (sharded)."""
    run = job.run
    if report is not None:
        try:
            data = read_json(run.sensitivity_load) if run.sensitivity_load.is_file() else {}
        except MpqError:
            data = {}
        data[f"{job.kind}_{job.metric}"] = report
        write_json(run.sensitivity_load, data)
    if isinstance(scorer, Sqnr):
        floor = float_floor(job.cfg, scorer)
        write_json(run.float_floor, floor)
        warning = inseparable(result, floor["sensitivity_floor_db"])
        if warning:
            print(f"[sensitivity] warning: {job.kind} {job.metric}: {warning}", flush=True)
    write_sensitivity(job.out, {n: read_back(vals) for n, vals in result.items()}, job.bits)


def float_floor(cfg: DictConfig, scorer: Sqnr) -> dict[str, Any]:
    """The float noise floors (SQNR in dB, +inf when exact): ``run_floor_db``, the calibration run's FP
    output (``model.dtype``) against this pass's FP output (``sensitivity.dtype``); ``sensitivity_floor_db``,
    this pass's FP output against the same weights in fp32 (first batch; +inf when already fp32). A
    quantization error below a floor is masked by that dtype's own rounding."""
    for k in range(len(scorer.batches)):
        if k not in scorer.refs:
            scorer.run_fp(k)
    params = dict(scorer.qm.denoiser.named_parameters())
    sens_floor = float("inf")
    if next(iter(params.values())).dtype != torch.float32:
        from torch.func import functional_call

        fp32 = {k: v.float() for k, v in params.items()}  # buffers (the quant params) are left as they are
        kwargs = scorer.inputs(0)
        kwargs = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()
        }
        with torch.no_grad():
            hi = functional_call(scorer.qm.denoiser, fp32, args=(), kwargs={**kwargs, "return_dict": False})[0]
        sens_floor = sqnr(scorer.refs[0], hi)
    return {
        "model_dtype": cfg.model.dtype,
        "sensitivity_dtype": cfg.sensitivity.dtype,
        "run_floor_db": scorer.float_floor_db(),
        "sensitivity_floor_db": sens_floor,
    }


def inseparable(
    result: dict[str, list[float]], floor_db: float, margin_db: float = 3.0, close_db: float = 1.0
) -> str | None:
    """A warning when layers' scores at two candidate bits lie within ``close_db`` of each other and within
    ``margin_db`` of the float floor: their order is then decided by rounding noise, not by the bits."""
    if not math.isfinite(floor_db):
        return None
    layers = [
        n
        for n, vals in result.items()
        if any(min(a, b) >= floor_db - margin_db and abs(a - b) < close_db for a, b in zip(vals, vals[1:]))
    ]
    if not layers:
        return None
    return (
        f"{len(layers)} layers (first: {layers[0]}) score two bit-widths within {close_db} dB of each other near the "
        f"{floor_db:.1f} dB float floor of sensitivity.dtype; their order is rounding noise: use sensitivity.dtype=fp32"
    )
