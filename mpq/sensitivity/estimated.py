"""Sensitivity files by estimate: ``sensitivity.method=local|fisher`` (every layer x bit from one pass a batch), and
``hybrid``'s SQNR file (the estimate everywhere, the exact metric for the uncertain layers, the rest moved onto the
exact scale).

The estimate of a kind serves both of its files: it is kept once as ``sensitivity/estimate/<kind>.<estimator>.yaml``
(resumable, sharded by layer); the file is then made from it by pure functions (:func:`estimate_file_values`,
:func:`hybrid_values`) and written at the edge.
"""

from __future__ import annotations

import time
from typing import Any

from mpq.calibration.record import CalibData
from mpq.families import family_of
from mpq.runner.choices import ESTIMATORS
from mpq.runner.files import write_json
from mpq.runner.progress import progress
from mpq.runner.sharded import ShardedWork, run_sharded
from mpq.search.mixdq_files import read_sensitivity, write_sensitivity
from mpq.sensitivity.estimators import as_ssim, estimate_values, run_estimator
from mpq.sensitivity.exact import exact_subset
from mpq.sensitivity.hybrid import calibrate, uncertain_layers
from mpq.sensitivity.job import SensitivityJob, layers_to_score, read_back

Values = dict[str, list[float]]


def estimated_file(job: SensitivityJob) -> Values:
    """An estimator's file (``local``, ``fisher``), or ``hybrid``'s SQNR file: the estimate for every layer, the
    exact SQNR for the uncertain ones (:func:`~mpq.sensitivity.hybrid.uncertain_layers`), the estimate moved onto
    the exact scale by the per-bit median offset on them elsewhere; ``sensitivity/hybrid_<kind>_sqnr.json`` says
    which and the offsets."""
    hybrid = job.method not in ESTIMATORS
    estimator = job.cfg.sensitivity.estimator if hybrid else job.method
    how: dict[str, Any] = {"method": job.method}
    if hybrid:
        how.update(estimator=estimator, hybrid_fraction=job.cfg.sensitivity.hybrid_fraction)
    # made whole on every rank from the sharded work below: nothing of its own to share out or save
    work = ShardedWork.of(job.out, job.signature(job.names, **how), job.names, persist=job.write)

    def compute() -> tuple[Values, dict[str, Any] | None]:
        t0 = time.perf_counter()
        every = layers_to_score(job.qm.names, job.cfg, "sqnr", family_of(job.qm.denoiser).name)  # serves both files
        est = estimate(job, estimator, every)
        est = {n: est[n] for n in job.names}
        if not hybrid:
            return estimate_file_values(est, job.metric), None
        seconds = {"estimate": time.perf_counter() - t0}
        chosen = uncertain_layers(est, job.cfg.sensitivity.hybrid_fraction)
        t1 = time.perf_counter()
        exact = exact_subset(job, chosen)
        seconds["exact"] = time.perf_counter() - t1
        return hybrid_values(est, exact, chosen, len(job.bits), estimator, seconds)

    values, _ = run_sharded(
        work,
        job.out,
        compute=compute,
        result=lambda made: made,
        write=lambda made: _write(job, *made),
        read=lambda: (job.read_finished(), None),
        force=job.force,
    )
    return values


def estimate_file_values(est: Values, metric: str) -> Values:
    """An estimator's file: the estimate (dB) as the SQNR file, mapped onto a similarity scale as the SSIM file; as
    the file holds them (an estimated SSIM is 1 - S/L: 6 decimals, MixDQ's, would round the 8-bit ones all to 1.0, so
    12)."""
    if metric == "sqnr":
        return {n: read_back(vals) for n, vals in est.items()}
    return {n: read_back([as_ssim(v) for v in vals], 12) for n, vals in est.items()}


def hybrid_values(
    est: Values, exact: Values, chosen: list[str], n_bits: int, estimator: str, seconds: dict[str, float]
) -> tuple[Values, dict[str, Any]]:
    """Hybrid's SQNR file from the estimate and the exact numbers of the ``chosen`` layers, as the file holds them;
    and its report (which layers, the offsets, the time each part took)."""
    result, fit = calibrate(est, exact, n_bits)
    report = {
        "estimator": estimator,
        "layers": len(est),
        "recomputed": chosen,
        "fraction_recomputed": len(chosen) / max(1, len(est)),
        "fit": fit,
        "seconds": seconds,
    }
    return {n: read_back(result[n]) for n in est}, report


def _write(job: SensitivityJob, values: Values, report: dict[str, Any] | None) -> None:
    """Rank 0: hybrid's report (and what it recomputed, said), the file."""
    if report is not None:
        write_json(job.run.hybrid_report(job.kind, job.metric), report)
        print(
            f"{job.label} (hybrid, {report['estimator']}): {len(report['recomputed'])} of {report['layers']} layers "
            f"({report['fraction_recomputed']:.0%}) recomputed exactly",
            flush=True,
        )
    write_sensitivity(job.out, values, job.bits)


def estimate(job: SensitivityJob, estimator: str, names: list[str]) -> Values:
    """Every layer of ``names`` estimated (dB), sharded by layer, resumable; on every rank. Kept as
    ``sensitivity/estimate/<kind>.<estimator>.yaml`` (the SQNR and the SSIM file read the same estimate)."""
    path = job.run.estimate_file(job.kind, estimator)
    work = job.work(path, job.signature(names, metric="estimate", estimator=estimator), names)

    def compute() -> Values:
        calib = CalibData.open(job.run)
        bar = progress(
            total=calib.num_batches(job.cfg.sensitivity.batch_size),
            disable=not job.show,
            desc=f"{work.d.tag()}sensitivity {job.kind} ({estimator})",
        )
        try:
            for _ in run_estimator(
                estimator, job.pipe, job.qm, job.cfg, job.run, calib, work.mine, job.bits, job.kind, work.state
            ):
                bar.update(1)
                work.save()
        finally:
            bar.close()
            job.qm.set_fp()
        return {name: estimate_values(work.state[name]["sums"]) for name in work.mine}

    return run_sharded(
        work,
        path,
        compute=compute,
        result=lambda merged: {n: read_back(merged[n]) for n in names},
        write=lambda values: write_sensitivity(path, values, job.bits),
        read=lambda: read_sensitivity(path, job.bits),
        force=job.force,
        label=f"[sensitivity] {job.kind} ({estimator})",
        unit="layers",
    )
