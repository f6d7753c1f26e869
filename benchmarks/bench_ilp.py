"""Integer-program cost on an SDXL-size instance: the full candidate family.

Sizes come from the SDXL UNet config on the meta device (794 layers; 420
content x {2,4,8}, 374 quality x {4,8} for weights; {4,8} for activations).
The sensitivity values are synthetic but shaped like real ones (SQNR rising
~6 dB a bit with per-layer offsets; SSIM rising toward 1), since no
published sensitivity file ships with mpq; pass --sensitivity-dir with MixDQ
files (weight_sqnr.yaml, weight_ssim.yaml, act_...) to use real ones.

    python benchmarks/bench_ilp.py [--solvers CBC SCIP] [--points 100]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from mpq.cost import CostModel
from mpq.layers import CONTENT, QUALITY, meta_layers
from mpq.runner.config import load_config
from mpq.search.build import build_problem, run_entries
from mpq.search.mixdq_files import read_sensitivity
from mpq.search.sweep import run_sweep, sweep_grid


def synthetic_sensitivity(layers, bits, seed=0):
    rng = np.random.default_rng(seed)
    sqnr, ssim = {}, {}
    for layer in layers:
        base = rng.uniform(15, 45)
        sqnr[layer.name] = [float(base + 6.02 * (b - 8) + rng.normal(0, 1.5)) for b in bits]
        loss = rng.lognormal(-5, 1.2)
        ssim[layer.name] = [float(1 - loss * 4.0 ** ((8 - b) / 2) * rng.uniform(0.8, 1.2)) for b in bits]
    return ssim, sqnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", nargs="+", default=["CBC", "SCIP"])
    ap.add_argument("--sensitivity-dir", default=None)
    ap.add_argument("--time-limit", type=float, default=20.0)
    args = ap.parse_args()
    cfg = load_config("sdxl-turbo")
    bits = list(cfg.quant.bits)
    print(
        "| solver | mode | kind | points | distinct plans | optimal | max gap | mean solve (s) | max solve (s) | total "
        "(s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    grand: dict[str, float] = {}
    for solver in args.solvers:
        for mode in ("mpq", "reference"):
            for kind in ("weight", "act"):
                layers = meta_layers(cfg)
                if args.sensitivity_dir:
                    d = Path(args.sensitivity_dir)
                    ssim, sqnr = (
                        read_sensitivity(d / f"{kind}_ssim.yaml", 3),
                        read_sensitivity(d / f"{kind}_sqnr.yaml", 3),
                    )
                else:
                    ssim, sqnr = synthetic_sensitivity(layers, bits, seed=1 if kind == "act" else 0)
                kc = cfg.search[kind]
                allowed = {CONTENT: list(kc.bits_content), QUALITY: list(kc.bits_quality)}
                problem = build_problem(
                    kind,
                    run_entries(kind, layers, CostModel.from_config(cfg)),
                    {n: v for n, v in ssim.items() if any(l.name == n and l.group == CONTENT for l in layers)},
                    sqnr,
                    bits,
                    allowed,
                )
                s = cfg.search.copy()
                s.solver, s.time_limit_s = solver, args.time_limit
                s[kind].k_num = 10  # the family: 10 targets x 10 K = 100 points for weights and for acts
                targets, ks = sweep_grid(s, kind)
                import tempfile

                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    rows = run_sweep(problem, kind, mode, targets, ks, s, Path(tmp), show=False)
                total = time.perf_counter() - t0
                grand[solver] = grand.get(solver, 0.0) + total
                solved = [r for r in rows if r.feasible]
                gaps = [r.gap for r in solved if not math.isnan(r.gap)]
                per = total / len(rows)
                print(
                    f"| {solver} | {mode} | {kind} | {len(rows)} | {len({r.plan_file for r in solved})} | "
                    f"{sum(r.status == 'OPTIMAL' for r in rows)}/{len(rows)} | {max(gaps, default=0):.1e} | {per:.3f} "
                    "| "
                    f"{max(r.seconds for r in rows):.3f} | {total:.1f} |",
                    flush=True,
                )
    for solver, t in grand.items():
        print(f"{solver}: whole family (2 modes x weights+acts x 100 points) {t:.1f} s")


if __name__ == "__main__":
    main()
