"""Cheap sensitivity estimators against the exact per-layer scores: rank agreement, time, and the plans they lead to.

    python benchmarks/bench_estimators.py [--config tiny-sdxl] [--n 60] [--no-plans] [key=value ...]

1. An exact run (``mpq run``, exact sensitivity, named weight budgets 3.5 / 4 / 5 bits) in
   outputs/<config>-est-exact (reused when finished).
2. **Agreement**: every estimator (local, fisher) recomputed on that run (nothing written), and hybrid's SQNR
   file; per (weight|act) x (SQNR|SSIM) x bit, Spearman and Kendall rank correlation over layers against the exact
   file (SSIM: the content layers).
3. **Time**, one process, same calibration set: each estimator's four files against the exact fast path's, both
   recomputed here side by side.
4. **Plans** (unless --no-plans): ``mpq run`` with sensitivity.method=fisher and =hybrid in
   outputs/<config>-est-<method> (same seeds, calibration and checkpoint settings); the best weight plan at 3.5, 4
   and 5 bits (selection/weight_budgets.csv) and the chosen W+A plan of each method, with the exact run's and
   uniform W4 / W8 (FP activations) and W4A8: held-out MSE vs FP (``eval.prompts_file``, the first N) with paired
   bootstrap intervals of estimated / exact, and adherence.
Writes outputs/<config>-est-exact/bench/estimators.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau, spearmanr

from mpq.calibration.checkpoint import quantized_pipeline, read_manifest
from mpq.commands.main import _quiet_libraries
from mpq.commands.main import main as mpq_main
from mpq.images import PromptEmbeddings, generate, to_array
from mpq.metrics import image_mse, paired_bootstrap_ratio
from mpq.plan import BitPlan, final_plan, read_plan
from mpq.prompts import cycle, read_prompts
from mpq.runner.choices import KINDS, METRICS
from mpq.runner.config import load_config
from mpq.runner.files import read_csv, write_json
from mpq.runner.rundir import RunDir
from mpq.search.mixdq_files import MAX_SQNR_DB, read_sensitivity
from mpq.sensitivity.stage import compute_sensitivity, read_back
from mpq.shapes.judge import adherence

BUDGETS = ["3.5", "4.0", "5.0"]


def _run(config: str, outdir: Path, overrides: list[str]) -> RunDir:
    budgets = f"search.weight.budgets=[{','.join(BUDGETS)}]"
    if mpq_main(["run", "--config", config, "--outdir", str(outdir), budgets, *overrides]) != 0:
        raise SystemExit(f"mpq run failed for {outdir}")
    return RunDir(outdir)


def agreement(est: dict[str, list[float]], exact: dict[str, list[float]], j: int) -> tuple[float, float]:
    names = [n for n in exact if n in est and np.isfinite(exact[n][j]) and np.isfinite(est[n][j])]
    a, b = [est[n][j] for n in names], [exact[n][j] for n in names]
    return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--n", type=int, default=60, help="held-out prompts for the plans (default 60)")
    ap.add_argument("--no-plans", action="store_true", help="agreement and time only")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    _quiet_libraries()
    name = load_config(args.config, args.overrides).name
    base = _run(args.config, Path("outputs") / f"{name}-est-exact", args.overrides)
    cfg = base.load_config(None, args.overrides)
    bits = list(read_manifest(base.ckpt)["bits"])
    pipe, _, _ = quantized_pipeline(cfg, base)
    out: dict[str, Any] = {"config": name, "bits": bits, "agreement": [], "seconds": {}}

    # ------------------------------------------------------------------ agreement and time
    exact = {f"{k}_{m}": read_sensitivity(base.sensitivity_file(k, m), len(bits)) for k in KINDS for m in METRICS}
    timing: dict[str, float] = {}
    for method in ("fast", "local", "fisher"):
        with tempfile.TemporaryDirectory() as tmp:  # a copy of the run without its sensitivity: the files as made
            skip = shutil.ignore_patterns(
                "sensitivity", "candidates", "selection", "report", "bench", "generated_images"
            )
            shutil.copytree(base.root, Path(tmp) / "run", ignore=skip)
            run = RunDir(Path(tmp) / "run")
            t0 = time.perf_counter()
            values = {
                f"{k}_{m}": compute_sensitivity(cfg, run, k, m, method, pipe, show=False)
                for k in KINDS
                for m in METRICS
            }
            timing[method] = time.perf_counter() - t0
        if method == "fast":

            def capped(v: list[float]) -> list[float]:  # the files' reader caps +inf (a dead layer) at MAX_SQNR_DB
                return [min(x, MAX_SQNR_DB) for x in read_back(v)]

            same = all({n: capped(v) for n, v in values[key].items()} == exact[key] for key in exact)
            print(f"exact fast path recomputed: {timing[method]:.1f} s (equals the run's files: {same})")
            continue
        for key, est in values.items():
            for j, b in enumerate(bits):
                rho, tau = agreement(est, exact[key], j)
                out["agreement"].append({"method": method, "file": key, "bits": b, "spearman": rho, "kendall": tau})
    out["seconds"] = timing
    print(f"\n{name}: rank agreement with the exact scores (Spearman / Kendall over layers)")
    print(f"{'method':<8} {'file':<12} " + " ".join(f"{'W/A' + str(b):>14}" for b in bits))
    for method in ("local", "fisher"):
        for key in exact:
            rows = [r for r in out["agreement"] if r["method"] == method and r["file"] == key]
            print(f"{method:<8} {key:<12} " + " ".join(f"{r['spearman']:6.3f}/{r['kendall']:6.3f} " for r in rows))
    print(
        "time for the four files, one process: exact fast "
        + f"{timing['fast']:.1f} s; "
        + "; ".join(f"{m} {timing[m]:.2f} s ({timing['fast'] / timing[m]:.0f}x faster)" for m in ("local", "fisher"))
    )
    if args.no_plans:
        write_json(base.root / "bench" / "estimators.json", out)
        return

    # ------------------------------------------------------------------ plans
    runs = {"exact": base}
    for method in ("fisher", "hybrid"):
        runs[method] = _run(
            args.config, Path("outputs") / f"{name}-est-{method}", [f"sensitivity.method={method}", *args.overrides]
        )
    for method in ("hybrid",):
        rep = json.loads((runs[method].sensitivity / "hybrid_weight_sqnr.json").read_text())
        out[f"{method}_weight_recomputed"] = rep["fraction_recomputed"]
        hyb = read_sensitivity(runs[method].sensitivity_file("weight", "sqnr"), len(bits))
        for j, b in enumerate(bits):
            rho, tau = agreement(hyb, exact["weight_sqnr"], j)
            out["agreement"].append(
                {"method": "hybrid", "file": "weight_sqnr", "bits": b, "spearman": rho, "kendall": tau}
            )
    rows = [r for r in out["agreement"] if r["method"] == "hybrid"]
    print(
        f"hybrid weight_sqnr ({out['hybrid_weight_recomputed']:.0%} of layers exact): "
        + " ".join(f"{r['spearman']:6.3f}/{r['kendall']:6.3f}" for r in rows)
    )
    plans: dict[str, BitPlan] = {}
    names = [e["name"] for e in read_manifest(base.ckpt)["layers"]]
    for label, b in (("uniform W4", 4), ("uniform W8", 8)):
        plans[label] = BitPlan.uniform(names, b, None)
    plans["uniform W4A8"] = BitPlan.uniform(names, 4, 8)
    for method, run in runs.items():
        for row in read_csv(run.selection / "weight_budgets.csv"):
            if row["plan_file"] and row["budget"] in BUDGETS:
                plans[f"{method} W{row['budget']}"] = BitPlan(read_plan(run.scored_plan("weight", row["plan_file"])))
        plans[f"{method} chosen W+A"] = final_plan(run)
    listed = read_prompts(cfg.eval.prompts_file, "eval.prompts_file")
    prompts, seeds = cycle(listed, min(args.n, len(listed)), cfg.sampling.seed)
    pipe, qm, _ = quantized_pipeline(cfg, base)
    text = PromptEmbeddings(pipe, cfg)
    fp = to_array(generate(pipe, prompts, seeds, cfg, text=text))
    per_image: dict[str, np.ndarray] = {}
    results: dict[str, dict[str, Any]] = {}
    from mpq.calibration.checkpoint import run_layers
    from mpq.cost import CostModel

    cost, infos = CostModel.from_config(cfg), run_layers(cfg, base)
    for label, plan in plans.items():
        qm.apply(plan)
        images = generate(pipe, prompts, seeds, cfg, text=text)
        qm.set_fp()
        per_image[label] = image_mse(to_array(images), fp)
        adh = adherence(images, prompts)
        results[label] = {
            "mse": float(per_image[label].mean()),
            "adherence": None if adh is None else adh["all"],
            "weight_bytes": cost.plan_cost(plan, infos).weight_bytes,
            "weight_avg_bits": cost.plan_cost(plan, infos).weight_avg_bits,
        }
    print(
        f"\n{name}: plans on {len(prompts)} held-out prompts (MSE vs FP; ratio to the exact-sensitivity plan, 95% CI)"
    )
    for label, r in results.items():
        method, _, point = label.partition(" ")
        ref = f"exact {point}"
        ratio = ""
        if method in ("fisher", "hybrid") and ref in per_image:
            m, lo, hi = paired_bootstrap_ratio(per_image[label], per_image[ref])
            ratio = f"  {m:.2f}x exact ({lo:.2f}-{hi:.2f})"
            r["ratio_to_exact"] = [m, lo, hi]
        adh = "" if r["adherence"] is None else f", adherence {r['adherence']:.0%}"
        print(
            f"  {label:<22} {r['weight_bytes']:>10,.0f} B ({r['weight_avg_bits']:.2f} bits)  MSE {r['mse']:.3g}{adh}"
            f"{ratio}"
        )
    out["plans"] = results
    write_json(base.root / "bench" / "estimators.json", out)
    print(f"\nwrote {base.root / 'bench' / 'estimators.json'}")


if __name__ == "__main__":
    main()
