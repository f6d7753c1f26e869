"""Where the error of a quantized pipeline comes from: precision traces of the chosen plan and uniform W4A8 over
held-out prompts, averaged, and what a trace costs relative to one generation.

    python benchmarks/bench_trace.py [--config tiny-sd3] [--outdir RUN] [--n 8] [key=value ...]

Uses a finished run (``mpq run`` first when its selection is missing). For each plan and each of the first N
evaluation prompts (``eval.prompts_file``; the embedded models: held-out scenes) one ``mpq trace`` (both modes,
every layer); prints, per component call, the mean over prompts of its SQNR against FP end to end and isolated, the
layers whose own (isolated) error is largest, the image MSE, and the cost in generations; writes
RUN/bench/trace/<plan>/ (the traces), RUN/bench/trace/trace_<plan>_components.png and _layers.png (the averaged
trace drawn like one) and RUN/bench/trace/summary.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from mpq.calibration.checkpoint import read_manifest
from mpq.commands.main import _quiet_libraries
from mpq.commands.main import main as mpq_main
from mpq.plan import BitPlan, final_plan
from mpq.prompts import cycle, read_prompts
from mpq.report.plots import plot_trace_components, plot_trace_layers
from mpq.runner.config import load_config
from mpq.runner.files import write_json
from mpq.runner.rundir import RunDir
from mpq.trace import trace
from mpq.trace.files import _json_safe

METRICS = ("mae", "cos", "sqnr_db", "max_abs")


def _mean_rows(traces: list[dict[str, Any]], part: str, mode: str, key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of the same call (``key`` fields) averaged over traces (SQNR: the mean of dB, +inf kept only when
    every trace is exact)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in traces:
        for r in t[part][mode]:
            groups.setdefault(tuple(r[k] for k in key), []).append(r)
    out = []
    for rows in groups.values():
        row = {k: rows[0][k] for k in rows[0] if k not in METRICS}
        for m in METRICS:
            vals = [r[m] for r in rows]
            finite = [v for v in vals if math.isfinite(v)]
            row[m] = float(np.mean(finite)) if finite else vals[0]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sd3")
    ap.add_argument("--outdir", default=None, help="run directory (default outputs/<config>)")
    ap.add_argument("--n", type=int, default=8, help="held-out prompts per plan (default 8)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    _quiet_libraries()
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.outdir or Path("outputs") / cfg.name)
    if not run.final_weight.is_file():
        code = mpq_main(["run", "--config", args.config, "--outdir", str(run.root), *args.overrides])
        if code:
            raise SystemExit(code)
    cfg = run.load_config(None, args.overrides)
    names = [e["name"] for e in read_manifest(run.ckpt)["layers"]]
    listed = read_prompts(cfg.eval.prompts_file, "eval.prompts_file") if cfg.eval.prompts_file else None
    if listed is None:
        from mpq.calibration.record import calib_prompts

        listed = calib_prompts(run)[0]
    prompts, seeds = cycle(listed, min(args.n, len(listed)), cfg.sampling.seed)
    plans = {"chosen": final_plan(run), "W4A8": BitPlan.uniform(names, 4, 8)}
    bench = run.root / "bench" / "trace"
    summary: dict[str, Any] = {"config": cfg.name, "prompts": len(prompts), "plans": {}}
    for label, plan in plans.items():
        traces = []
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            traces.append(trace(cfg, run, plan, label, prompt=p, seed=s, out=bench / label / f"{i:02d}"))
        modes = traces[0]["modes"]
        mean = {
            "modes": modes,
            "components": {m: _mean_rows(traces, "components", m, ("id",)) for m in modes},
            "layers": {m: _mean_rows(traces, "layers", m, ("name", "step")) for m in modes},
        }
        plot_trace_components(mean, bench / f"trace_{label}_components.png")
        plot_trace_layers(mean, bench / f"trace_{label}_layers.png")
        mse = [t["image"]["mse"] for t in traces]
        cost = [t["cost_generations"] for t in traces]
        one = [t["seconds"]["one_generation"] for t in traces]
        total = [t["seconds"]["trace_total"] for t in traces]
        print(
            f"\n{cfg.name}, {label}: {len(traces)} prompts, {cfg.sampling.steps} steps, guidance "
            f"{cfg.sampling.guidance_scale:g}; image MSE vs FP {np.mean(mse):.3g} (mean); a trace "
            f"{np.mean(total):.2f} s = {np.mean(cost):.1f} generations of {np.mean(one):.2f} s"
        )
        print(f"  {'component call':<26} {'end-to-end SQNR':>16} {'isolated SQNR':>14}   (dB, mean over prompts)")
        iso = {r["id"]: r for r in mean["components"].get("isolated", [])}
        for r in mean["components"]["end_to_end"]:
            if r["mae"] == 0 and iso.get(r["id"], {}).get("mae", 0) == 0:
                continue
            print(f"  {r['id']:<26} {r['sqnr_db']:16.2f} {iso.get(r['id'], {}).get('sqnr_db', math.nan):14.2f}")
        worst = sorted(mean["layers"].get("isolated", []), key=lambda r: r["sqnr_db"])[:5]
        print(
            "  layers with the largest own error (isolated SQNR, dB): "
            + "; ".join(f"{r['name'][6:]} step {r['step']} {r['sqnr_db']:.1f}" for r in worst)
        )
        summary["plans"][label] = {
            "image_mse_mean": float(np.mean(mse)),
            "cost_generations_mean": float(np.mean(cost)),
            "one_generation_s": float(np.mean(one)),
            "trace_s": float(np.mean(total)),
            "components": mean["components"],
            "worst_layers_isolated": worst,
        }
    write_json(bench / "summary.json", _json_safe(summary))
    print(f"\nwrote {bench}/summary.json and trace_<plan>_components.png / _layers.png")


if __name__ == "__main__":
    main()
