"""The sensitivity stage: ``sensitivity/{weight,act}_{sqnr,ssim}.yaml`` (MixDQ's format) and the float floor.

* SQNR (dB) of the denoiser output against this pass's FP output, over the
  whole calibration set: every layer (MixDQ's SQNR file covers all layers;
  the search uses it for the quality group).
* SSIM of the generated image against the FP image (same prompt and seed),
  averaged over ``sensitivity.num_images`` images: the content group.

Each file is resumable and shardable over torchrun ranks (items: layers,
:class:`~mpq.runner.sharded.ShardedWork`); ``method=fast`` computes the same
numbers as ``naive`` with the FP prefix cache.
"""

from __future__ import annotations

import math
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mpq.calibration.checkpoint import quantized_pipeline, weight_candidates
from mpq.calibration.record import CalibData
from mpq.errors import MpqError
from mpq.families import Family, family_of
from mpq.layers import KINDS, assign_groups, content_patterns
from mpq.metrics import sqnr
from mpq.models import torch_dtype
from mpq.quant.model import PREFIX, QuantModel
from mpq.runner import distributed
from mpq.runner.config import settings
from mpq.runner.files import file_digest, read_json, write_json
from mpq.runner.progress import progress
from mpq.runner.rundir import RunDir
from mpq.runner.sharded import ShardedWork, signature
from mpq.search.mixdq_files import read_sensitivity, write_sensitivity
from mpq.sensitivity import METRICS
from mpq.sensitivity.costs import layer_costs
from mpq.sensitivity.estimators import ESTIMATORS, as_ssim, estimate_values, run_estimator
from mpq.sensitivity.loop import LoopOptions, score_layers
from mpq.sensitivity.scorers import SCORERS, Sqnr, make_scorer

METHODS = ("fast", "naive", *ESTIMATORS, "hybrid")  # exact (fast = naive's numbers), estimates, both
# settings that do not change a number (fast and naive agree; chunking and saving are bookkeeping)
_NOT_IN_SIGNATURE = ("method", "save_every_s", "cache_budget_mb", "share_bits")


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


def layers_to_score(names: list[str], cfg: DictConfig, metric: str, family: str) -> list[str]:
    """The layers ``metric`` scores (SQNR: all; SSIM: the content group) among ``names``, restricted to
    ``sensitivity.layers`` when set, in module order."""
    group = SCORERS[metric].group
    patterns_content = content_patterns(cfg, family)
    groups = assign_groups(names, patterns_content, warn=False)
    chosen = [n for n in names if group is None or groups[n] == group]
    patterns = list(cfg.sensitivity.layers)
    if patterns:
        chosen = [n for n in chosen if any(fnmatchcase(n, p) or fnmatchcase(n[len(PREFIX) :], p) for p in patterns)]
        if not chosen and group is None:
            raise MpqError(
                f"sensitivity.layers={patterns} matches no layer; see `mpq layers --config ...` for the names"
            )
    elif not chosen:
        raise MpqError(
            f"no layer is in the content group (groups.content={patterns_content}); the SSIM file would be empty: "
            "fix groups.content (see `mpq layers --config ...`)"
        )
    return chosen


def _signature(
    cfg: DictConfig, run: RunDir, kind: str, metric: str, bits: list[Any], names: list[str], estimate: str = ""
) -> str:
    """What the numbers depend on: the checkpoint's content, the sensitivity and sampling settings, the layers, and
    for an estimate (``estimate``: local, fisher, hybrid) the method (the exact ones agree with each other)."""
    sens = {k: v for k, v in OmegaConf.to_container(cfg.sensitivity).items() if k not in _NOT_IN_SIGNATURE}  # type: ignore[union-attr]
    if not estimate:  # settings of the estimates only: exact signatures stay what they were
        for key in ("estimator", "hybrid_fraction"):
            sens.pop(key, None)
    return signature(
        kind=kind,
        metric=metric,
        bits=bits,
        ckpt=file_digest(run.ckpt),
        sens=sens,
        sampling=settings(cfg, "sampling"),
        layers=names,
        **({"estimate": estimate} if estimate else {}),
    )


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
    d_main = distributed.current().is_main
    if not names:  # a sensitivity.layers subset without content layers
        if d_main and write:
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
    if method in ESTIMATORS or (method == "hybrid" and metric == "sqnr"):
        return _estimated(cfg, run, kind, metric, method, pipe, qm, bits, names, show, force, write)
    fast = method != "naive"  # hybrid: the content group's SSIM exactly, by the fast path
    work = ShardedWork(
        run.sensitivity,
        f"{kind}_{metric}",
        _signature(cfg, run, kind, metric, bits, names),
        names,
        progress=lambda s: len(s["batches"]),
        save_every_s=cfg.sensitivity.save_every_s,
        persist=write,
    )
    if not force and work.finished(out):
        if d_main:
            print(f"[sensitivity] {kind} {metric}: already made with these settings ({out})", flush=True)
        return read_sensitivity(out, bits)
    scorer = make_scorer(metric, pipe, qm, cfg, run, fast)
    _assign_by_cost(work, qm, run, names, metric, fast, len(bits))
    result, busy = _score(work, qm, scorer, bits, kind, cfg, fast, metric, show)
    result = work.collect(result, busy, "layers", f"[sensitivity] {kind} {metric}")
    if work.d.is_main and write:
        _write(run, out, {n: result[n] for n in names}, scorer, cfg, kind, metric, work.report, bits)
    work.finish(out)
    return {n: result[n] for n in names}


def _assign_by_cost(
    work: ShardedWork, qm: QuantModel, run: RunDir, names: list[str], metric: str, fast: bool, n_bits: int
) -> None:
    """Sharded: this rank's layers, by estimated cost (rank 0 estimates; a layer's numbers do not depend on which
    rank runs it)."""
    if work.d.enabled:
        costs = layer_costs(qm, CalibData.open(run), names, metric, fast, n_bits) if work.d.is_main else None
        work.assign(work.d.broadcast(costs))


def _score(
    work: ShardedWork,
    qm: QuantModel,
    scorer: Any,
    bits: list[Any],
    kind: str,
    cfg: DictConfig,
    fast: bool,
    metric: str,
    show: bool,
) -> tuple[dict[str, list[float]], float]:
    """This rank's layers scored, continuing from the saved state; (results, busy seconds)."""
    saved = work.resume()
    done = sum(len(s["batches"]) for s in saved.values())
    if done and work.d.is_main:
        print(
            f"[sensitivity] {kind} {metric}: resuming, {done} of {len(scorer.batches) * len(work.items)} layer-batch "
            "items already done",
            flush=True,
        )
    bar = progress(
        total=len(scorer.batches) * len(work.mine),
        initial=sum(len(s["batches"]) for s in work.state.values()),
        unit="layer",
        disable=not show,
        desc=f"{work.d.tag()}sensitivity {kind} {metric} ({'fast' if fast else 'naive'})",
    )

    def after_layer(name: str, n: int) -> None:
        bar.update(n)
        work.save()

    opts = LoopOptions(
        fast,
        fast and share_bits(cfg.sensitivity.share_bits, metric, family_of(qm.denoiser), cfg.sampling.guidance_scale),
        cfg.sensitivity.cache_budget_mb * 2**20,
    )
    t0 = time.perf_counter()
    try:
        result = score_layers(qm, scorer, work.mine, bits, kind, opts, work.state, after_layer)
    finally:
        bar.close()
    return result, time.perf_counter() - t0


def _estimated(
    cfg: DictConfig,
    run: RunDir,
    kind: str,
    metric: str,
    method: str,
    pipe: Any,
    qm: QuantModel,
    bits: list[Any],
    names: list[str],
    show: bool,
    force: bool,
    write: bool,
) -> dict[str, list[float]]:
    """An estimator's file (``local``, ``fisher``), or ``hybrid``'s SQNR file: the estimate for every layer, the
    exact SQNR for the uncertain ones (:func:`uncertain_layers`), the estimate moved onto the exact scale by the
    per-bit median offset on them elsewhere; ``sensitivity/hybrid_<kind>_sqnr.json`` says which and the offsets."""
    out = run.sensitivity_file(kind, metric)
    key = f"{kind}_{metric}"
    d_main = distributed.current().is_main
    outer = ShardedWork(
        run.sensitivity, key, _signature(cfg, run, kind, metric, bits, names, method), names, persist=write
    )
    if not force and outer.finished(out):
        if d_main:
            print(f"[sensitivity] {kind} {metric}: already made with these settings ({out})", flush=True)
        return read_sensitivity(out, bits)
    estimator = method if method in ESTIMATORS else cfg.sensitivity.estimator
    t0 = time.perf_counter()
    every = layers_to_score(qm.names, cfg, "sqnr", family_of(qm.denoiser).name)  # one estimate serves both files
    est = _estimate(cfg, run, kind, estimator, pipe, qm, bits, every, show, write, force)
    est = {n: est[n] for n in names}
    seconds = {"estimate": time.perf_counter() - t0}
    if method == "hybrid":
        from mpq.sensitivity.hybrid import calibrate, uncertain_layers

        chosen = uncertain_layers(est, cfg.sensitivity.hybrid_fraction)
        t1 = time.perf_counter()
        exact = _exact_subset(cfg, run, kind, metric, pipe, qm, bits, chosen, show, write, force)
        seconds["exact"] = time.perf_counter() - t1
        result, fit = calibrate(est, exact, len(bits))
        report = {
            "estimator": estimator,
            "layers": len(names),
            "recomputed": chosen,
            "fraction_recomputed": len(chosen) / max(1, len(names)),
            "fit": fit,
            "seconds": seconds,
        }
        if d_main and write:
            write_json(run.sensitivity / f"hybrid_{kind}_{metric}.json", report)
            print(
                f"[sensitivity] {kind} {metric} (hybrid, {estimator}): {len(chosen)} of {len(names)} layers "
                f"({report['fraction_recomputed']:.0%}) recomputed exactly",
                flush=True,
            )
    else:
        result = est if metric == "sqnr" else {n: [as_ssim(v) for v in vals] for n, vals in est.items()}
    # an estimated SSIM is 1 - S/L: 6 decimals (MixDQ's files) would round the 8-bit ones all to 1.0
    digits = 12 if metric == "ssim" and method in ESTIMATORS else 6
    result = {n: read_back(result[n], digits) for n in names}
    if d_main and write:
        write_sensitivity(out, result, bits)
    outer.finish(out)
    return result


def _estimate(
    cfg: DictConfig,
    run: RunDir,
    kind: str,
    estimator: str,
    pipe: Any,
    qm: QuantModel,
    bits: list[Any],
    names: list[str],
    show: bool,
    write: bool,
    force: bool,
) -> dict[str, list[float]]:
    """Every layer of ``names`` estimated (dB), sharded by layer, resumable; on every rank. Kept as
    ``sensitivity/estimate/<kind>.<estimator>.yaml`` (the SQNR and the SSIM file read the same estimate)."""
    path = run.sensitivity / "estimate" / f"{kind}.{estimator}.yaml"
    work = _side_work(cfg, path, _signature(cfg, run, kind, "estimate", bits, names, estimator), names, write)
    if not force and work.finished(path):
        return read_sensitivity(path, bits)
    work.resume()
    calib = CalibData.open(run)
    bar = progress(
        total=calib.num_batches(cfg.sensitivity.batch_size),
        disable=not show,
        desc=f"{work.d.tag()}sensitivity {kind} ({estimator})",
    )
    t0 = time.perf_counter()
    try:
        for _ in run_estimator(estimator, pipe, qm, cfg, run, calib, work.mine, bits, kind, work.state):
            bar.update(1)
            work.save()
    finally:
        bar.close()
        qm.set_fp()
    mine = {name: estimate_values(work.state[name]["sums"]) for name in work.mine}
    result = work.collect(mine, time.perf_counter() - t0, "layers", f"[sensitivity] {kind} ({estimator})")
    return _keep(work, path, result, names, write, bits)


def _exact_subset(
    cfg: DictConfig,
    run: RunDir,
    kind: str,
    metric: str,
    pipe: Any,
    qm: QuantModel,
    bits: list[Any],
    names: list[str],
    show: bool,
    write: bool,
    force: bool,
) -> dict[str, list[float]]:
    """The exact metric (fast path) for ``names`` only: the same numbers the exact file holds for them. Kept as
    ``sensitivity/estimate/<kind>_<metric>.exact.yaml``."""
    if not names:
        return {}
    path = run.sensitivity / "estimate" / f"{kind}_{metric}.exact.yaml"
    work = _side_work(cfg, path, _signature(cfg, run, kind, metric, bits, names, "exact-subset"), names, write)
    if not force and work.finished(path):
        return read_sensitivity(path, bits)
    scorer = make_scorer(metric, pipe, qm, cfg, run, True)
    _assign_by_cost(work, qm, run, names, metric, True, len(bits))
    result, busy = _score(work, qm, scorer, bits, kind, cfg, True, metric, show)
    result = work.collect(result, busy, "layers", f"[sensitivity] {kind} {metric} (hybrid, exact)")
    return _keep(work, path, result, names, write, bits)


def _side_work(cfg: DictConfig, path: Path, sig: str, names: list[str], write: bool) -> ShardedWork:
    """The resumable, sharded work behind one of hybrid's or an estimator's kept files (``sensitivity/estimate/``)."""
    return ShardedWork(
        path.parent,
        path.stem,
        sig,
        names,
        progress=lambda s: len(s["batches"]),
        save_every_s=cfg.sensitivity.save_every_s,
        persist=write,
    )


def _keep(
    work: ShardedWork, path: Path, result: dict[str, list[float]], names: list[str], write: bool, bits: list[Any]
) -> dict[str, list[float]]:
    """Rank 0 writes ``path`` (as the sensitivity files round); done marked; the values as read back."""
    values = {n: read_back(result[n]) for n in names}
    if work.d.is_main and write:
        write_sensitivity(path, values, bits)
    work.finish(path)
    return values


def _write(
    run: RunDir,
    out: Path,
    result: dict[str, list[float]],
    scorer: Any,
    cfg: DictConfig,
    kind: str,
    metric: str,
    report: list[dict[str, float]] | None,
    bits: list[Any],
) -> None:
    """Rank 0: the MixDQ-format file (and the formats' scores beside it), the float floor (SQNR), the ranks' load
    (sharded)."""
    if report is not None:
        path = run.sensitivity / "distributed.json"
        try:
            data = read_json(path) if path.is_file() else {}
        except MpqError:
            data = {}
        data[f"{kind}_{metric}"] = report
        write_json(path, data)
    if isinstance(scorer, Sqnr):
        floor = float_floor(cfg, scorer)
        write_json(run.float_floor, floor)
        warning = inseparable(result, floor["sensitivity_floor_db"])
        if warning:
            print(f"[sensitivity] warning: {kind} {metric}: {warning}", flush=True)
    write_sensitivity(out, {n: read_back(vals) for n, vals in result.items()}, bits)


def read_back(values: list[float], digits: int = 6) -> list[float]:
    """Values as the sensitivity files hold them (6 decimals): a result used at once equals one read back."""
    return [round(v, digits) if math.isfinite(v) else v for v in values]


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
