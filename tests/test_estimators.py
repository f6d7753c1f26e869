"""Sensitivity estimators (local, fisher, hybrid) on the tiny random model: finite, monotone in bits for most
layers, ranked like the exact scores above a floor a shuffled score fails; hybrid's recomputed layers equal the exact
file bit for bit; the program and selection take the files."""

from __future__ import annotations

import math
import random
import shutil

import pytest
from scipy.stats import spearmanr

from mpq.calibration.ptq import run_ptq
from mpq.calibration.record import run_calibration
from mpq.errors import MpqError
from mpq.models import load_pipeline
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir
from mpq.search.mixdq_files import read_sensitivity
from mpq.sensitivity.hybrid import calibrate, offset_fit, uncertain_layers
from mpq.sensitivity.stage import compute_sensitivity

from conftest import SMALL

FLOOR = 0.5  # Spearman against exact: loose, but a shuffled score fails it (checked below)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """tiny-sdxl-random, calibrated, with the exact SQNR files of both kinds."""
    cfg = load_config("tiny-sdxl-random", [*SMALL, "sensitivity.num_images=4"])
    run = RunDir(tmp_path_factory.mktemp("est") / "run")
    run.save_config(cfg)
    pipe = load_pipeline(cfg)
    run_calibration(cfg, run, pipe)
    run_ptq(cfg, run, pipe)
    for kind in ("weight", "act"):
        compute_sensitivity(cfg, run, kind, "sqnr", "fast", pipe, show=False)
    return cfg, run, pipe


def _rho(a: dict[str, list[float]], b: dict[str, list[float]], j: int) -> float:
    names = [n for n in b if math.isfinite(a[n][j]) and math.isfinite(b[n][j])]
    return float(spearmanr([a[n][j] for n in names], [b[n][j] for n in names]).statistic)


@pytest.mark.parametrize("method", ["local", "fisher"])
def test_estimates_are_finite_and_monotone_in_bits(random_run, method):
    cfg, run, pipe = random_run
    for kind in ("weight", "act"):
        est = compute_sensitivity(cfg, run, kind, "sqnr", method, pipe, show=False, write=False)
        assert len(est) == 123 and all(math.isfinite(v) for vals in est.values() for v in vals)
        monotone = sum(vals[0] <= vals[1] <= vals[2] for vals in est.values()) / len(est)
        assert monotone >= 0.9, (method, kind, monotone)  # more bits, a smaller estimated error


def test_fisher_ranks_layers_like_the_exact_scores(random_run):
    cfg, run, pipe = random_run
    for kind in ("weight", "act"):
        exact = read_sensitivity(run.sensitivity_file(kind, "sqnr"), 3)
        est = compute_sensitivity(cfg, run, kind, "sqnr", "fisher", pipe, show=False, write=False)
        names = list(exact)
        shuffled_values = [est[n] for n in names]
        random.Random(0).shuffle(shuffled_values)
        shuffled = dict(zip(names, shuffled_values))
        for j in range(3):
            assert _rho(est, exact, j) > FLOOR, (kind, j)
            assert _rho(shuffled, exact, j) < FLOOR  # the floor is one a meaningless score fails


def test_hybrid_recomputes_its_uncertain_layers_exactly(random_run, tmp_path):
    cfg, run, pipe = random_run
    copy = RunDir(tmp_path / "hybrid")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("sensitivity"))
    result = compute_sensitivity(cfg, copy, "weight", "sqnr", "hybrid", pipe, show=False)
    report = __import__("json").loads((copy.sensitivity / "hybrid_weight_sqnr.json").read_text())
    estimate = read_sensitivity(copy.sensitivity / "estimate" / "weight.fisher.yaml", 3)
    assert report["recomputed"] == uncertain_layers(estimate, cfg.sensitivity.hybrid_fraction)
    assert 0 < report["fraction_recomputed"] < 0.7
    exact = read_sensitivity(run.sensitivity_file("weight", "sqnr"), 3)
    written = read_sensitivity(copy.sensitivity_file("weight", "sqnr"), 3)
    assert written == result
    for name in report["recomputed"]:
        assert written[name] == exact[name]  # bit for bit, as the files hold them
    others = [n for n in written if n not in report["recomputed"]]
    assert any(written[n] != estimate[n] for n in others)  # the estimate put on the exact scale
    for j in range(3):  # exact where it matters, the rest on its scale: ranks at least as well as the estimate
        assert _rho(written, exact, j) > _rho(estimate, exact, j) - 0.01


def test_hybrid_helpers():
    assert offset_fit([1, 2, 3, 4], [3, 5, 7, 19]) == 3.5  # the median difference: one outlier does not move it
    assert offset_fit([math.inf], [4.0]) == 0.0
    est = {"a": [1.0, 2.0], "b": [5.0, 0.5], "c": [9.0, 9.0], "d": [7.0, 8.0]}
    assert uncertain_layers(est, 0.25) == ["a", "b"]  # the most sensitive at each bit, united
    out, fit = calibrate(est, {"a": [11.0, 12.0], "b": [15.0, 10.5]}, 2)
    assert out["a"] == [11.0, 12.0] and out["c"] == pytest.approx([19.0, 19.0]) and len(fit) == 2  # offset 10


def test_unknown_method_is_one_line(random_run):
    cfg, run, pipe = random_run
    with pytest.raises(MpqError, match="unknown sensitivity method 'kl'"):
        compute_sensitivity(cfg, run, "weight", "sqnr", "kl", pipe, show=False, write=False)
    with pytest.raises(MpqError, match="sensitivity.estimator"):
        load_config("tiny-sdxl-random", ["sensitivity.estimator=taylor"])
