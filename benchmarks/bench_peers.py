"""mpq against a data-free peer at equal bytes: SDNQ (SD.Next's quantization engine) on the embedded model.

    pip install -e .[peers]                      # sdnq (installs without touching torch: see the README)
    python benchmarks/bench_peers.py             # tiny-sdxl, 48 held-out prompts, weight-only
    python benchmarks/bench_peers.py --out bench_out --n 24

What runs (weights only, activations FP, on the same pipeline):

* **mpq**: a full ``mpq run`` (calibration, PTQ, sensitivity, full-range search, selection on the calibration
  prompts); at each byte level, the plan selection ranks best (its calibration-prompt MSE) among the
  candidates at no more bytes -- chosen without seeing the evaluation images -- and mpq's uniform plans at every
  bit-width 2..8;
* **SDNQ** ``sdnq_post_load_quant`` on every Linear/Conv2d (``quant_conv``, no skip keys, no size minimum: the
  same layers): static int2..int8 row-wise (``group_size=-1``) and with its default groups, and its "dynamic"
  mode (each layer the first dtype from int2 up whose weight error is under a threshold) over a range of
  thresholds, row-wise and default groups; at each byte level, SDNQ's best configuration at no more bytes
  *chosen by its evaluation MSE* (an oracle choice: favours the peer).

Bytes, the same way for both: packed integers at their bits + every stored scale and zero point at 2 bytes, a
layer left FP at 2 bytes an element, over the denoiser's quantizable layers. MSE: per image, against the FP
pipeline's images of the same held-out prompts and seeds (neither tool chose them); ratios (mpq / SDNQ) with a
paired-bootstrap 95% interval over images. Writes ``peers.json`` (every point, per-image MSEs) and
``peers.png`` (MSE, log scale, against bytes) into ``--out``; the report page draws ``peers.json`` when
``eval.peers`` names it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# SDNQ compiles its dequantizers with torch.compile on CPU (minutes of Inductor builds for every layer shape);
# eager mode computes the same dequantized weights
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from _imagebench import ImageBench, best_scored  # noqa: E402

from mpq.calibration.checkpoint import load_checkpoint  # noqa: E402
from mpq.commands.main import main as mpq_main  # noqa: E402
from mpq.metrics import paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan, read_plan  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402
from mpq.report.plots import plot_peers  # noqa: E402
from mpq.runner.rundir import RunDir  # noqa: E402
from mpq.selection import read_scores  # noqa: E402

THRESHOLDS = [0.1, 0.07, 0.04, 0.025, 0.01, 0.005, 0.0025]  # dynamic, row-wise (and 0.005 with default groups)
STATIC = ["int2", "int3", "uint3", "int4", "uint4", "int5", "int6", "int8"]  # row-wise (and int4, int8 default groups)


# ----------------------------------------------------------------------------- SDNQ
def sdnq_configs() -> list[dict[str, Any]]:
    def static(dtype: str, group: int) -> dict[str, Any]:
        gname = "row-wise" if group < 0 else "default groups"
        return {"label": f"SDNQ {dtype}, {gname}", "weights_dtype": dtype, "group_size": group}

    def dynamic(t: float, group: int) -> dict[str, Any]:
        gname = "row-wise" if group < 0 else "default groups"
        return {
            "label": f"SDNQ dynamic {t:g}, {gname}",
            "weights_dtype": "int2",
            "group_size": group,
            "use_dynamic_quantization": True,
            "dynamic_loss_threshold": t,
        }

    return (
        [static(d, -1) for d in STATIC]
        + [static(d, 0) for d in ("int4", "int8")]
        + [dynamic(t, -1) for t in THRESHOLDS]
        + [dynamic(0.005, 0)]
    )


def sdnq_quantize(model: torch.nn.Module, conf: dict[str, Any]) -> torch.nn.Module:
    from sdnq.quantizer import sdnq_post_load_quant

    kw = {k: v for k, v in conf.items() if k != "label"}
    return sdnq_post_load_quant(
        model,
        quant_conv=True,
        add_skip_keys=False,
        minimum_allowed_numel=0,
        minimum_allowed_channel_size=0,
        torch_dtype=torch.float32,
        **kw,
    )


def sdnq_bytes(model: torch.nn.Module) -> tuple[float, dict[str, int]]:
    """(bytes, layers per dtype): packed integers at the dtype's bits + scales/zero points at 2 bytes; every
    Linear/Conv2d SDNQ left FP at 2 bytes an element."""
    from sdnq.common import dtype_dict

    total, dtypes = 0.0, {}
    for mod in model.modules():
        d = getattr(mod, "sdnq_dequantizer", None)
        if d is not None:
            bits = dtype_dict[d.weights_dtype]["num_bits"]
            total += -(-math.prod(d.original_shape) * bits // 8)
            for name in ("scale", "zero_point", "svd_up", "svd_down"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    total += 2 * t.numel()
            dtypes[d.weights_dtype] = dtypes.get(d.weights_dtype, 0) + 1
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            total += 2 * mod.weight.numel()
            dtypes["FP"] = dtypes.get("FP", 0) + 1
    return total, dtypes


# ----------------------------------------------------------------------------- mpq
def mpq_run(config: str, root: Path, extra: list[str]) -> RunDir:
    """A full main job up to selection (the final images and the report are not needed here)."""
    run = RunDir(root)
    for stage in ("calib", "ptq", "sensitivity", "search", "select"):
        assert mpq_main([stage, "--config", config, "--outdir", str(root), *extra]) == 0, stage
    return run


def best_at(points: list[dict[str, Any]], limit: float, key: str) -> dict[str, Any] | None:
    ok = [p for p in points if p["bytes"] <= limit * (1 + 1e-9)]
    return min(ok, key=lambda p: p[key]) if ok else None


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts (one seed each)")
    ap.add_argument("--out", default="peers_out", help="folder for peers.json and peers.png")
    ap.add_argument("--levels", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0])
    ap.add_argument("--mpq", nargs="*", default=[], help="extra config overrides for the mpq run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = ImageBench(args.config, args.n)
    points: list[dict[str, Any]] = []

    # mpq: the run's weight candidates, chosen by selection's own (calibration-prompt) MSE
    tmp = Path(tempfile.mkdtemp())
    try:
        run = mpq_run(args.config, tmp / "run", args.mpq)
        cfg = run.load_config()
        wq = WeightQuant.from_config(cfg.quant.weight)
        load_checkpoint(run.ckpt, bench.qm)
        scores = read_scores(run.scores("weight"))  # selection's own MSE (calibration prompts), its bytes
        n_weights = sum(i.weight_numel for i in bench.infos)
        picks = {}  # at each level, the plan selection ranks best at no more bytes: chosen without the eval images
        for b in args.levels:
            best = best_scored(scores, n_weights * b / 8)
            if best:
                picks[best.plan_file] = best.mse
        for f, select_mse in picks.items():
            plan = BitPlan(read_plan(run.scored_plan("weight", f)))
            nbytes, mse = bench.mpq_point(plan, wq)
            points.append({"tool": "mpq", "label": f, "bytes": nbytes, "select_mse": select_mse, "mse": mse})
        print(f"mpq: {len(scores)} candidates, {len(picks)} picked ({time.perf_counter() - t0:.0f} s)", flush=True)
        bench.calibrate(wq, [2, 3, 4, 5, 6, 7, 8])
        for b in range(2, 9):
            nbytes, mse = bench.mpq_point(BitPlan.uniform(bench.names, b, None), wq)
            points.append(
                {"tool": "mpq uniform", "label": f"mpq uniform W{b} ({wq.label})", "bytes": nbytes, "mse": mse}
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # SDNQ
    for conf in sdnq_configs():
        info: dict[str, Any] = {}

        def make(model: torch.nn.Module, conf: dict[str, Any] = conf, info: dict[str, Any] = info) -> torch.nn.Module:
            q = sdnq_quantize(model, conf)
            info["bytes"], info["dtypes"] = sdnq_bytes(q)
            return q

        mse = bench.with_denoiser(make)
        points.append(
            {"tool": "SDNQ", "label": conf["label"], "bytes": info["bytes"], "dtypes": info["dtypes"], "mse": mse}
        )
        print(f"{conf['label']}: {info['bytes']:,.0f} bytes, MSE {mse.mean():.3g}", flush=True)

    report(points, args.levels, n_weights, out, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


def report(points: list[dict[str, Any]], levels: list[float], n_weights: int, out: Path, args: Any) -> None:
    for p in points:
        p["mean_mse"] = float(np.mean(p["mse"]))
    print(f"\n{args.config}, weight-only, {args.n} held-out prompts; bytes: packed + scales/zero points at 2 bytes\n")
    print("| plan | bytes | MSE vs FP |")
    print("|---|---:|---:|")
    for p in sorted(points, key=lambda p: p["bytes"]):
        print(f"| {p['label']} | {p['bytes']:,.0f} | {p['mean_mse']:.3g} |")
    mpq_pts = [dict(p, key=p["select_mse"]) for p in points if p["tool"] == "mpq"]
    sdnq_pts = [p for p in points if p["tool"] == "SDNQ"]
    print(
        "\nAt each byte level (bits per weight x weights / 8): mpq's plan chosen by selection (calibration prompts) "
        "vs SDNQ's best configuration on the evaluation images, both at no more bytes\n"
    )
    print("| level (bits/weight) | bytes | mpq plan | mpq MSE | SDNQ best | SDNQ MSE | mpq / SDNQ (95% CI) |")
    print("|---|---:|---|---:|---|---:|---|")
    rows = []
    for b in levels:
        limit = n_weights * b / 8
        m = best_at(mpq_pts, limit, "key")
        s = best_at(sdnq_pts, limit, "mean_mse")
        if m is None or s is None:
            print(f"| {b:g} | {limit:,.0f} | {m and m['label']} | | {s and s['label']} | | no plan |")
            continue
        r, lo, hi = paired_bootstrap_ratio(m["mse"], s["mse"])
        rows.append({"level": b, "bytes": limit, "mpq": m["label"], "sdnq": s["label"], "ratio": [r, lo, hi]})
        print(
            f"| {b:g} | {limit:,.0f} | {m['label']} | {m['mean_mse']:.3g} | {s['label']} | {s['mean_mse']:.3g} | "
            f"{r:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    data = {
        "config": args.config,
        "n_images": args.n,
        "byte_counting": "packed integers + every scale/zero point at 2 bytes; FP layers at 2 bytes an element",
        "points": [
            {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items() if k != "key"} for p in points
        ],
        "levels": rows,
    }
    (out / "peers.json").write_text(json.dumps(data, indent=1))
    plot_peers(points, out / "peers.png", f"{args.config}: mpq vs SDNQ, weight-only")
    print(f"\nwrote {out / 'peers.json'} and {out / 'peers.png'}")


if __name__ == "__main__":
    main()
