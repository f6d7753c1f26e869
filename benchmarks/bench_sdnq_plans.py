"""mpq's search in SDNQ's own formats against SDNQ's own choices, at equal bytes, and the SDNQ export's speed.

    pip install -e ".[sdnq]"
    python benchmarks/bench_sdnq_plans.py --config tiny-sdxl --out sdnq_out --refine 40
    python benchmarks/bench_sdnq_plans.py --config tiny-sd3 --out sdnq_sd3 --mpq sensitivity.num_images=8 --refine 40
                                                                    # ~11 min on 2 CPU cores (tiny-sd3)

What runs (weights only, activations FP, the same pipeline, every layer a candidate for both tools):

* **mpq**: ``target=sdnq`` (SDNQ's dtypes as the weight candidates, priced at the bytes SDNQ stores), calibration,
  sensitivity, the full-range search and selection on the calibration prompts; at each byte level, the plan
  selection ranks best among the candidates at no more bytes, chosen without seeing the evaluation images;
* **SDNQ**: ``sdnq_post_load_quant`` on every Linear/Conv2d (``quant_conv``, no skip keys, no size minimum): (a)
  every uniform dtype of :data:`STATIC` with its default groups, row-wise and groups of 64 and 128; (b) its
  dynamic mode (each layer the first dtype from int2 up whose weight error is under a threshold) over
  :data:`THRESHOLDS`, row-wise and default groups. At each level SDNQ's best configuration at no more bytes,
  **chosen by its evaluation MSE** (an oracle pick: it favours SDNQ).

Bytes, one way for both: the tensors SDNQ stores for a quantized layer (codes, fp32 scales and zero points), a
layer left FP at 2 bytes an element. Levels are bits a weight: bytes x 8 / weights. MSE: per image against the FP
pipeline's images of held-out prompts and seeds neither tool saw; ratios mpq / SDNQ with a paired-bootstrap 95%
interval over images; prompt adherence (the embedded judge) beside MSE. Speed: one generation of the SDNQ export of
mpq's plan, loaded by stock diffusers in a process without mpq, against the FP pipeline and a uniform SDNQ model of
no more bytes, side by side in that process (the whole call, median of repeats). Writes ``sdnq_plans.json`` into
``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")  # eager dequantizers: what mpq simulates, no Inductor builds

from _imagebench import ImageBench, adherence, mpq_points, refined_points, runtime_parser  # noqa: E402
from bench_peers import best_at, sdnq_quantize  # noqa: E402

from mpq.commands.main import main as mpq_main  # noqa: E402
from mpq.export.sdnq_format import sdnq_tensor_bytes  # noqa: E402
from mpq.metrics import image_mse, paired_bootstrap_ratio  # noqa: E402
from mpq.plan import write_plan  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402
from mpq.runner.rundir import RunDir  # noqa: E402

STATIC = ["int2", "uint2", "int3", "uint3", "int4", "uint4", "int5", "uint5", "int6", "int8", "fp4", "fp6"]
GROUPS = {0: "default groups", -1: "row-wise", 64: "groups of 64", 128: "groups of 128"}
THRESHOLDS = [0.1, 0.05, 0.025, 0.01, 0.005, 0.0025]
LEVELS = [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]


def sdnq_configs() -> list[dict[str, Any]]:
    static = [
        {"label": f"SDNQ {d}, {g}", "weights_dtype": d, "group_size": k} for d in STATIC for k, g in GROUPS.items()
    ]
    dynamic = [
        {
            "label": f"SDNQ dynamic {t:g}, {GROUPS[k]}",
            "weights_dtype": "int2",
            "group_size": k,
            "use_dynamic_quantization": True,
            "dynamic_loss_threshold": t,
        }
        for t in THRESHOLDS
        for k in (-1, 0)
    ]
    return static + dynamic


def sdnq_points(
    bench: ImageBench, count_bytes: Callable[[torch.nn.Module], float] | None = None
) -> list[dict[str, Any]]:
    """Every configuration of :func:`sdnq_configs` on the evaluation images: label, configuration, bytes
    (``count_bytes`` of the quantized denoiser; default :func:`stored_bytes`), per-image MSE, adherence."""
    count = count_bytes or stored_bytes
    out = []
    for conf in sdnq_configs():
        info: dict[str, Any] = {}

        def make(model: torch.nn.Module, conf: dict[str, Any] = conf, info: dict[str, Any] = info) -> torch.nn.Module:
            q = sdnq_quantize(model, conf)
            info["bytes"] = count(q)
            return q

        images = bench.images_with(make)
        mse = image_mse(images, bench.refs)
        out.append(
            {
                "tool": "SDNQ",
                "label": conf["label"],
                "conf": conf,
                "bytes": info["bytes"],
                "mse": mse,
                "adherence": adherence(bench, images),
            }
        )
        print(f"{conf['label']}: {info['bytes']:,.0f} bytes, MSE {mse.mean():.3g}", flush=True)
    return out


def stored_bytes(model: torch.nn.Module) -> float:
    """The tensors SDNQ stores for its quantized layers; a Linear/Conv2d left FP at 2 bytes an element."""
    total = 0.0
    for mod in model.modules():
        if getattr(mod, "sdnq_dequantizer", None) is not None:
            total += sdnq_tensor_bytes(mod)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            total += 2 * mod.weight.numel()
    return total


# ----------------------------------------------------------------------------- speed
_SPEED = """
import json, statistics, sys, time, torch
from diffusers import DiffusionPipeline
folders, call, repeats = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
absent = json.loads(sys.argv[4])  # components saved as absent (SD3 without T5): diffusers wants them named
out = {}
for label, folder in folders.items():
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **{k: None for k in absent})
    pipe.set_progress_bar_config(disable=True)
    times = []
    for r in range(repeats + 1):  # the first call warms up
        t = time.perf_counter()
        pipe("a large blue square in the center", generator=torch.Generator().manual_seed(r), **call)
        times.append(time.perf_counter() - t)
    out[label] = statistics.median(times[1:])
assert "mpq" not in sys.modules
print(json.dumps(out))
"""


def speed(run: RunDir, plan_file: Path, uniform: dict[str, Any], cfg: Any, out: Path, repeats: int) -> dict[str, float]:
    """Seconds a generation: FP, mpq's plan exported for SDNQ, and a uniform SDNQ model, in one fresh process."""
    from mpq.models import load_pipeline

    folders = {"FP": str(out / "fp"), "mpq plan (SDNQ export)": str(out / "mpq_sdnq")}
    for f in folders.values():
        shutil.rmtree(f, ignore_errors=True)
    load_pipeline(cfg, dtype=torch.float32).save_pretrained(folders["FP"])
    argv = ["export", "--base_path", str(run.root), "--out", folders["mpq plan (SDNQ export)"], "--format", "sdnq"]
    assert mpq_main([*argv, "--weight-plan", str(plan_file), "--fp-dtype", "fp32"]) == 0
    from sdnq.loader import save_sdnq_model

    from mpq.families import family_of
    from mpq.images import call_kwargs
    from mpq.models.loader import absent_components

    pipe = load_pipeline(cfg, dtype=torch.float32)
    name = family_of(pipe).component
    setattr(pipe, name, sdnq_quantize(getattr(pipe, name), {k: v for k, v in uniform.items() if k != "label"}))
    folders[uniform["label"]] = str(out / "uniform_sdnq")
    shutil.rmtree(folders[uniform["label"]], ignore_errors=True)
    save_sdnq_model(pipe, folders[uniform["label"]], is_pipeline=True)
    call = call_kwargs(pipe, cfg)  # as mpq calls the family
    absent = sorted(absent_components(folders["FP"]))
    res = subprocess.run(
        [sys.executable, "-c", _SPEED, json.dumps(folders), json.dumps(call), str(repeats), json.dumps(absent)],
        capture_output=True,
        text=True,
        cwd=out,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = runtime_parser(__doc__, "sdnq_out")
    ap.add_argument("--repeats", type=int, default=10, help="timed generations per model (after one warm-up)")
    ap.add_argument(
        "--refine",
        type=int,
        default=0,
        help="also refine the plan selection picks at each level, this many evaluations each (select.refine_evals): "
        "what a run with that level as its budget hands the user; the refined plans join the pick by selection MSE",
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = ImageBench(args.config, args.n)
    n_weights = sum(i.weight_numel for i in bench.infos)
    wq = WeightQuant()
    points: list[dict[str, Any]] = []

    overrides = ["target=sdnq", "search.fp_bytes=2", *args.mpq]
    limits = [n_weights * b / 8 for b in LEVELS]
    mpq, run = mpq_points(bench, args.config, overrides, limits, wq, t0)
    points += mpq
    if args.refine:
        points += refined_points(bench, run, limits, wq, args.refine, "mpq")
    points += sdnq_points(bench)
    rows = table(points, n_weights, args)
    data = {
        "config": args.config,
        "n_images": args.n,
        "mpq_overrides": overrides,
        "byte_counting": "SDNQ's stored tensors (codes, fp32 scales/zero points); FP layers at 2 bytes an element",
        "points": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in points],
        "levels": rows,
    }
    (out / "sdnq_plans.json").write_text(json.dumps(data, indent=1))  # before the timing: the table is kept
    timed = min(rows, key=lambda r: abs(r["level"] - 4.5)) if rows else None  # a typical level
    if timed is not None:
        point = next(p for p in points if p["tool"] == "mpq" and p["label"] == timed["mpq"])
        if "plan" in point:  # a refined plan: no candidate file holds it
            plan_file = write_plan(out / "timed_plan.yaml", point["plan"])
        else:
            plan_file = run.scored_plan("weight", timed["mpq"])
        uniform = next(p["conf"] for p in points if p["label"] == timed["sdnq"])
        data["seconds_per_generation"] = speed(run, plan_file, uniform, bench.cfg, out, args.repeats)
        print("\nseconds a generation (stock diffusers, no mpq, CPU):", json.dumps(data["seconds_per_generation"]))
        (out / "sdnq_plans.json").write_text(json.dumps(data, indent=1))
    shutil.rmtree(run.root.parent, ignore_errors=True)
    print(f"\nwrote {out / 'sdnq_plans.json'}; total {time.perf_counter() - t0:.0f} s", flush=True)


def table(points: list[dict[str, Any]], n_weights: int, args: Any) -> list[dict[str, Any]]:
    for p in points:
        p["mean_mse"] = float(np.mean(p["mse"]))
    mpq_pts = [dict(p, key=p["select_mse"]) for p in points if p["tool"] == "mpq"]
    sdnq_pts = [p for p in points if p["tool"] == "SDNQ"]
    print(f"\n{args.config}, weight-only, {args.n} held-out prompts; bytes as SDNQ stores them\n")
    print(
        "| bits/weight | mpq plan (selection's pick) | mpq MSE | adh. | SDNQ best (oracle) | SDNQ MSE | adh. | "
        "mpq / SDNQ (95% CI) |"
    )
    print("|---|---|---:|---:|---|---:|---:|---|")
    rows = []
    for b in LEVELS:
        limit = n_weights * b / 8
        m, s = best_at(mpq_pts, limit, "key"), best_at(sdnq_pts, limit, "mean_mse")
        if m is None or s is None:
            print(f"| {b:g} | {m and m['label']} | | | {s and s['label']} | | | no plan at these bytes |")
            continue
        r, lo, hi = paired_bootstrap_ratio(m["mse"], s["mse"])
        rows.append(
            {
                "level": b,
                "mpq": m["label"],
                "sdnq": s["label"],
                "ratio": [r, lo, hi],
                "mpq_mse": m["mean_mse"],
                "sdnq_mse": s["mean_mse"],
            }
        )
        print(
            f"| {b:g} | {m['label']} | {m['mean_mse']:.3g} | {m['adherence']:.0%} | {s['label']} | "
            f"{s['mean_mse']:.3g} | {s['adherence']:.0%} | {r:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return rows


if __name__ == "__main__":
    main()
