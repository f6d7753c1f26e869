"""Timestep-aware activation ranges (``quant.act.step_groups``): do ranges per group of sampling steps pay?

    python benchmarks/bench_step_groups.py --config tiny-sd3                  # uniform plans, ~2 min on 2 CPU cores
    python benchmarks/bench_step_groups.py --config tiny-sd3 --runs           # + a whole default run per setting

Held-out prompts and seeds neither side saw (:class:`_imagebench.ImageBench`). For each number of step groups
(``--groups``, default 1 2 4; 1 is one range over all steps, the default), PTQ on the same calibration data, then
the held-out image MSE of uniform plans (activations alone at 8/6/4 bits, and with weights at 4 or 8 bits), as a
ratio to one range (paired bootstrap 95% interval, and the median over images of the per-image ratio).

``--runs`` also runs ``mpq run`` (the default flow: sensitivity, search, selection with the activation budget
chosen by measurement) once per setting and scores each run's chosen W+A plan and uniform W4A8 with its own
checkpoint on the held-out images: issue 36 item 2's comparison, with and without step groups. Writes
``step_groups.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _imagebench import ImageBench  # noqa: E402
from bench_simple_plans import median_ratio  # noqa: E402

from mpq.calibration.checkpoint import load_checkpoint  # noqa: E402
from mpq.calibration.ptq import calibrate  # noqa: E402
from mpq.commands.main import main as mpq_main  # noqa: E402
from mpq.cost import average_bits  # noqa: E402
from mpq.metrics import paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan, final_plan  # noqa: E402
from mpq.runner.rundir import RunDir  # noqa: E402

PLANS = ((None, 8), (None, 6), (None, 4), (8, 8), (4, 8), (8, 4), (4, 6))


def ratio_cell(a: np.ndarray, b: np.ndarray) -> str:
    r, lo, hi = paired_bootstrap_ratio(a, b)
    return f"{r:.2f} ({lo:.2f}-{hi:.2f}), median {median_ratio(a, b):.2f}"


def uniform_table(bench: ImageBench, groups: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in groups:
        bench.cfg.quant.act.step_groups = g
        t0 = time.perf_counter()
        calibrate(bench.qm, bench.calib, bench.cfg, show=False)
        ptq_s = time.perf_counter() - t0
        out[str(g)] = {
            "ptq_s": ptq_s,
            "mse": {f"W{w or 'FP'}A{a}": bench.plan_mse(BitPlan.uniform(bench.names, w, a)).tolist() for w, a in PLANS},
        }
        print(f"[bench] {g} step group(s): PTQ {ptq_s:.1f} s", flush=True)
    base = out[str(groups[0])]["mse"]
    print(f"\nUniform plans, held-out MSE with G step groups over G = {groups[0]} (mean ratio, 95% interval, median):")
    print("| plan | MSE, G = " + str(groups[0]) + " | " + " | ".join(f"G = {g}" for g in groups[1:]) + " |")
    print("|---|---|" + "---|" * (len(groups) - 1))
    for plan in base:
        b = np.array(base[plan])
        cells = [ratio_cell(np.array(out[str(g)]["mse"][plan]), b) for g in groups[1:]]
        print(f"| {plan} | {b.mean():.3g} | " + " | ".join(cells) + " |")
    return out


def run_table(
    bench: ImageBench, config: str, groups: list[int], overrides: list[str], save: Any = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for g in groups:
            run = RunDir(Path(tmp) / f"g{g}")
            t0 = time.perf_counter()
            rc = mpq_main(
                ["run", "--config", config, "--outdir", str(run.root), f"quant.act.step_groups={g}", *overrides]
            )
            assert rc == 0, f"mpq run failed for step_groups={g}"
            wall = time.perf_counter() - t0
            load_checkpoint(run.ckpt, bench.qm)
            plan = final_plan(run)
            chosen = bench.plan_mse(plan)
            w4a8 = bench.plan_mse(BitPlan.uniform(bench.names, 4, 8))
            act_bits = average_bits((i.act_numel, plan.act.get(i.name)) for i in bench.infos)  # quantized layers
            out[str(g)] = {"wall_s": wall, "chosen": chosen.tolist(), "w4a8": w4a8.tolist(), "act_avg_bits": act_bits}
            if save is not None:
                save(out)  # each run kept as it finishes (a run takes minutes)
            print(
                f"[bench] run with {g} step group(s): {wall:.0f} s; chosen W+A {chosen.mean():.3g} (A{act_bits:.2f}), "
                f"W4A8 {w4a8.mean():.3g}",
                flush=True,
            )
    base = out[str(groups[0])]
    print("\nDefault run's chosen W+A plan (its own checkpoint), held-out MSE:")
    print(
        "| step groups | run | chosen W+A | act avg bits | uniform W4A8 | chosen / W4A8 | chosen / chosen at G = "
        f"{groups[0]} |"
    )
    print("|---|---|---|---|---|---|---|")
    for g in groups:
        r = out[str(g)]
        c, w = np.array(r["chosen"]), np.array(r["w4a8"])
        print(
            f"| {g} | {r['wall_s']:.0f} s | {c.mean():.3g} | {r['act_avg_bits']:.2f} | {w.mean():.3g} | "
            f"{ratio_cell(c, w)} | {ratio_cell(c, np.array(base['chosen']))} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sd3")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--runs", action="store_true", help="also a whole `mpq run` per setting (minutes each)")
    ap.add_argument("--mpq", nargs="*", default=[], help="overrides for the runs (key=value)")
    ap.add_argument("--out", type=Path, default=Path("step_groups"))
    args = ap.parse_args()
    bench = ImageBench(args.config, n=args.n)
    result: dict[str, Any] = {"config": args.config, "n": args.n, "groups": args.groups}
    result["uniform"] = uniform_table(bench, args.groups)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "step_groups.json"
    path.write_text(json.dumps(result))
    if args.runs:
        result["runs"] = run_table(
            bench,
            args.config,
            args.groups,
            args.mpq,
            lambda runs: path.write_text(json.dumps({**result, "runs": runs})),
        )
    path.write_text(json.dumps(result))
    print(f"\n[bench] wrote {path}")


if __name__ == "__main__":
    main()
