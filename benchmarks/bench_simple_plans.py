"""Is mpq's plan ever beaten by a simpler one? Every byte level from 2.5 to 8 bits a weight, each family mechanism
switched on and off.

    python benchmarks/bench_simple_plans.py --config tiny-sdxl --out simple_sdxl     # ~15 min on 2 CPU cores
    python benchmarks/bench_simple_plans.py --config tiny-sd3 --out simple_sd3       # ~35 min

Weights only (activations FP), held-out prompts and seeds neither side saw (:class:`_imagebench.ImageBench`).

* **Simple plans**: every uniform integer width from 2 to 8 bits with the run's own weight quantizer
  (``quant.weight``), scored on the evaluation images; at each level the best at no more bytes, **chosen by its
  evaluation MSE** (an oracle pick, in the simple plans' favour).
* **mpq**, one run per mechanism setting (calibration, PTQ and sensitivity shared where the setting leaves them
  alone): at each level the plan selection ranks best at no more bytes on the calibration prompts. Settings, each
  adding one mechanism to the one before: the program's plans alone; + uniform plans in the family
  (``search.uniform``); + the edge rules (``search.edge_rules``: the default); + 3-bit candidates
  (``quant.bits=[2,3,4,8]``, W3 allowed on both groups); + every calibration image in selection
  (``select.num_images`` = ``calib.num_samples``, where that is more than the default); apart from the chain,
  every width from 2 to 8 bits a candidate (W2 on content layers only), alone and with MixDQ's 2/4/8 swept too
  (``search.weight.also``: the trained configs' default).

``--sdnq`` adds SDNQ's configurations to the simple plans (the oracle pick is then over both: item 1 of the
"never beaten" goal). ``--refine N`` adds a column per setting: at each level, the selected plan refined as
selection refines its chosen one (``select.refine_evals=N``; every other column runs with refinement off).
``--mpq key=value ...`` runs every setting with those overrides (``sensitivity.method=fisher``); ``--compare
BASE.json OTHER.json`` prints OTHER's held-out MSE over BASE's at each level for the settings both have (paired
bootstrap).

Ratios mpq / best simple plan with a paired-bootstrap 95% interval over images, and the median over images of the
per-image ratio (one image drawing a different picture can move the mean alone); the goal is <= 0.8 at every level.
Bytes one way for both: codes plus every scale and offset at 2 bytes (:func:`_imagebench.weight_bytes`); levels
are bits a weight (bytes x 8 / weights). Writes ``simple_plans.json`` into ``--out``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _imagebench import ImageBench, refined_points, runtime_parser, selected_points  # noqa: E402
from bench_peers import best_at  # noqa: E402

from mpq.commands.main import main as mpq_main  # noqa: E402
from mpq.metrics import paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402
from mpq.runner.rundir import RunDir  # noqa: E402

LEVELS = [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]
THREE = ["quant.bits=[2,4,8]", "search.weight.bits_content=[2,4,8]", "search.weight.bits_quality=[4,8]"]
THREE_BIT = ["quant.bits=[2,3,4,8]", "search.weight.bits_content=[2,3,4,8]", "search.weight.bits_quality=[3,4,8]"]
EVERY_WIDTH = [
    "quant.bits=[2,3,4,5,6,7,8]",
    "search.weight.bits_content=[2,3,4,5,6,7,8]",
    "search.weight.bits_quality=[3,4,5,6,7,8]",
]
ALONE = "search.weight.also=[]"
UPSTREAM = ("quant.", "sensitivity.", "calib.", "sampling.", "model.")  # keys of the stages a base run makes
DEFAULT = "every width, 2/4/8 swept too (default)"


def settings(num_samples: int, num_images: int) -> dict[str, list[str]]:
    """Each mechanism setting's overrides: MixDQ's widths with one mechanism added after another, then the widths."""
    out = {
        "program only": [*THREE, ALONE, "search.uniform=false", "search.edge_rules=false"],
        "+ uniform plans": [*THREE, ALONE, "search.edge_rules=false"],
        "+ edge rules": [*THREE, ALONE],
        "+ 3-bit candidates": [*THREE_BIT, ALONE],
    }
    if num_samples > num_images:
        out["+ every calibration image in selection"] = [*THREE_BIT, ALONE, f"select.num_images={num_samples}"]
    out["every width 2-8"] = [*EVERY_WIDTH, ALONE]
    out[DEFAULT] = [*EVERY_WIDTH, "search.weight.also=[[2,4,8]]"]
    return out


def base_run(config: str, overrides: list[str], cache: dict[str, RunDir]) -> RunDir:
    """A run through sensitivity for the overrides that touch it (quant.*, sensitivity.*, ...), made once per
    distinct set."""
    ptq = tuple(o for o in overrides if o.startswith(UPSTREAM))
    key = repr(ptq)
    if key not in cache:
        run = RunDir(Path(tempfile.mkdtemp()) / "base")
        for stage in ("calib", "ptq", "sensitivity"):
            assert mpq_main([stage, "--config", config, "--outdir", str(run.root), *ptq]) == 0, stage
        cache[key] = run
    return cache[key]


def mechanism_points(
    bench: ImageBench,
    config: str,
    label: str,
    overrides: list[str],
    base: RunDir,
    limits: list[float],
    refine_evals: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    """(the plan selection ranks best at each byte limit, scored on the evaluation images; search + select s)."""
    run = RunDir(Path(tempfile.mkdtemp()) / "run")
    shutil.copytree(base.root, run.root)
    t0 = time.perf_counter()
    for stage in ("search", "select"):
        assert mpq_main([stage, "--config", config, "--outdir", str(run.root), *overrides]) == 0, stage
    seconds = time.perf_counter() - t0
    cfg = run.load_config()
    wq = WeightQuant.from_config(cfg.quant.weight)
    bench.calibrate(wq, list(cfg.quant.bits), list(cfg.quant.weight_formats))  # data-free: the run's own
    points, n = selected_points(bench, run, limits, wq, setting=label)
    if refine_evals:
        refined = refined_points(bench, run, limits, wq, refine_evals, label)
        points += refined
    shutil.rmtree(run.root.parent, ignore_errors=True)
    print(f"{label}: {n} candidates, {len(points)} picked, search + select {seconds:.0f} s", flush=True)
    return points, seconds


def sdnq_points(bench: ImageBench) -> list[dict[str, Any]]:
    """SDNQ's configurations of the peer benchmark (:func:`bench_sdnq_plans.sdnq_points`: every uniform dtype
    row-wise, with its default groups and groups of 64 and 128, and its dynamic mode over thresholds) as simple
    plans, scored on the evaluation images; bytes as mpq's are counted (:func:`bench_peers.sdnq_bytes`)."""
    from bench_peers import sdnq_bytes
    from bench_sdnq_plans import sdnq_points as peer_points

    return peer_points(bench, lambda q: sdnq_bytes(q)[0])


def pick(points: list[dict[str, Any]], limit: float) -> dict[str, Any] | None:
    """The point selection ranks best (its calibration-prompt MSE) at no more than ``limit`` bytes."""
    return best_at([dict(p, key=p["select_mse"]) for p in points], limit, "key")


def compare(base: Path, other: Path) -> None:
    """Print, per level and per setting both files have, ``other``'s held-out MSE over ``base``'s (paired bootstrap
    95% interval): e.g. fisher-sensitivity runs against exact ones (``--mpq sensitivity.method=fisher``)."""
    a, b = json.loads(base.read_text()), json.loads(other.read_text())
    n_weights = a.get("n_weights") or b["n_weights"]
    labels = [k for k in a["mpq"] if k in b["mpq"]]
    print(f"\n{other} / {base}, held-out MSE at each level\n")
    print("| bits/weight | " + " | ".join(labels) + " |")
    print("|---:|" + "---|" * len(labels))
    for level in a["levels"]:
        cells = []
        for label in labels:
            pa, pb = (pick(d["mpq"][label], level * n_weights / 8) for d in (a, b))
            if pa is None or pb is None:
                cells.append("no plan")
                continue
            r, lo, hi = paired_bootstrap_ratio(np.array(pb["mse"]), np.array(pa["mse"]))
            same = " (same plan)" if pa["label"] == pb["label"] and np.array_equal(pa["mse"], pb["mse"]) else ""
            cells.append(f"{r:.2f} ({lo:.2f}-{hi:.2f}){same}")
        print(f"| {level:.1f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = runtime_parser(__doc__, "simple_plans_out")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BASE", "OTHER"), help="compare two results and exit")
    ap.add_argument("--settings", nargs="*", default=None, help="only these mechanism settings (labels)")
    ap.add_argument(
        "--refine", type=int, default=0, help="also refine each level's selected plan, this many evaluations each"
    )
    ap.add_argument(
        "--sdnq",
        action="store_true",
        help="SDNQ's configurations join the simple plans (pip install -e '.[sdnq]'): every uniform dtype and group "
        "size and its dynamic mode, bytes counted as mpq's (scales and zero points at 2 bytes)",
    )
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = ImageBench(args.config, args.n)
    n_weights = sum(i.weight_numel for i in bench.infos)
    wq = WeightQuant.from_config(bench.cfg.quant.weight)
    simple: list[dict[str, Any]] = []
    for b in range(2, 9):
        bench.calibrate(wq, [b])
        nbytes, mse = bench.mpq_point(BitPlan.uniform(list(bench.names), b, None), wq)
        simple.append({"label": f"uniform W{b}", "bytes": nbytes, "mse": mse, "adherence": float("nan")})
        print(f"uniform W{b}: {nbytes * 8 / n_weights:.2f} bits/w, MSE {mse.mean():.3g}", flush=True)
    if args.sdnq:
        simple += sdnq_points(bench)
    limits = [lv * n_weights / 8 for lv in LEVELS]
    cfg = bench.cfg
    all_settings = settings(int(cfg.calib.num_samples), int(cfg.select.num_images))
    chosen = {k: v for k, v in all_settings.items() if args.settings is None or k in args.settings}
    cache: dict[str, RunDir] = {}
    mpq: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for label, overrides in chosen.items():
        overrides = [*overrides, "select.refine_evals=0"]  # refinement: its own column (--refine), at every level
        base = base_run(args.config, [*overrides, *args.mpq], cache)
        pts, seconds[label] = mechanism_points(
            bench, args.config, label, [*overrides, *args.mpq], base, limits, args.refine
        )
        for p in pts:
            mpq.setdefault(p.get("setting", label), []).append(p)
    rows = table(simple, mpq, n_weights, args)
    data = {
        "config": args.config,
        "n_images": args.n,
        "n_weights": n_weights,
        "overrides": args.mpq,
        "levels": LEVELS,
        "settings": chosen,
        "search_select_seconds": seconds,
        "simple": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in simple],
        "mpq": {
            k: [{kk: (v.tolist() if isinstance(v, np.ndarray) else v) for kk, v in p.items()} for p in pts]
            for k, pts in mpq.items()
        },
        "rows": rows,
    }
    (out / "simple_plans.json").write_text(json.dumps(data, indent=1))
    for run in cache.values():
        shutil.rmtree(run.root.parent, ignore_errors=True)
    print(f"\nwrote {out / 'simple_plans.json'}; total {time.perf_counter() - t0:.0f} s", flush=True)


def median_ratio(a: Any, b: Any) -> float:
    """The median over images of ``a``'s MSE over ``b``'s: what the typical image says, where the mean can follow one
    image that draws a different picture (near 2 bits a weight on the tiny models)."""
    return float(np.median(np.asarray(a) / np.maximum(np.asarray(b), 1e-30)))


def table(
    simple: list[dict[str, Any]], mpq: dict[str, list[dict[str, Any]]], n_weights: int, args: Any
) -> list[dict[str, Any]]:
    for p in simple + [p for pts in mpq.values() for p in pts]:
        p["mean_mse"] = float(np.mean(p["mse"]))
    labels = list(mpq)
    print(f"\n{args.config}, weight-only, {args.n} held-out prompts; mpq / best uniform plan at no more bytes\n")
    print("| bits/weight | best simple plan (oracle) | MSE | " + " | ".join(labels) + " |")
    print("|---:|---|---:|" + "---|" * len(labels))
    rows = []
    for level in LEVELS:
        limit = level * n_weights / 8
        s = best_at(simple, limit, "mean_mse")
        row: dict[str, Any] = {"bits": level, "best": s and s["label"], "best_mse": s and s["mean_mse"]}
        cells = []
        for label in labels:
            m = pick(mpq[label], limit)
            if m is None or s is None:
                cells.append("no plan" if m is None else f"{m['label']} (no uniform plan)")
                continue
            r, lo, hi = paired_bootstrap_ratio(m["mse"], s["mse"])
            med = median_ratio(m["mse"], s["mse"])
            row[label] = {
                "plan": m["label"],
                "mse": m["mean_mse"],
                "ratio": [r, lo, hi],
                "median_ratio": med,
                "adh": m["adherence"],
            }
            bold = "**" if r <= 0.8 else ""
            cells.append(f"{bold}{r:.2f}{bold} ({lo:.2f}-{hi:.2f}; median {med:.2f})")
        rows.append(row)
        best = f"{s['label']} ({s['bytes'] * 8 / n_weights:.2f})" if s else "none"
        print(f"| {level:.1f} | {best} | {s['mean_mse'] if s else float('nan'):.3g} | " + " | ".join(cells) + " |")
    print("\n| setting | worst ratio | best ratio | levels <= 0.8 | levels > 1 |")
    print("|---|---:|---:|---:|---:|")
    for label in labels:
        rs = [r[label]["ratio"][0] for r in rows if label in r]
        if rs:
            print(
                f"| {label} | {max(rs):.2f} | {min(rs):.2f} | {sum(x <= 0.8 for x in rs)}/{len(rs)} | "
                f"{sum(x > 1 for x in rs)}/{len(rs)} |"
            )
    return rows


if __name__ == "__main__":
    main()
