"""Which layers are content layers in an MMDiT? The search and selection under several group definitions.

    python benchmarks/bench_content_groups.py [--config tiny-sd3] [--root outputs/groups] [key=value ...]

For each definition of the content group (scored by SSIM of images; the rest by SQNR of the denoiser output),
a run directory ROOT/<definition> goes through sensitivity, search and selection with weight targets W4
(the chosen plan) and W3 (selection/weight_budgets.csv); both weight plans (activations FP) are then
scored on the evaluation prompts (the embedded models: the 60 held-out scenes) against FP: image MSE, SSIM,
prompt adherence. Writes ROOT/content_groups.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.commands.main import main as mpq_main
from mpq.images import generate, to_array
from mpq.layers import CONTENT, assign_groups
from mpq.metrics import image_mse
from mpq.plan import BitPlan, read_plan
from mpq.report.evaluate import eval_set, score_images
from mpq.runner.files import read_records, write_with
from mpq.runner.rundir import RunDir
from mpq.selection import BudgetBest

TEXT_PROJ = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TEXT_STREAM = [*TEXT_PROJ, "ff_context", "context_embedder"]
DEFINITIONS: dict[str, list[str]] = {
    "text-stream projections": TEXT_PROJ,
    "text stream": TEXT_STREAM,  # the SD3/Flux family default before this benchmark
    "text stream + image FFN": [*TEXT_STREAM, "ff"],
    "all attention": ["attn", "attn2"],
}
TARGETS = ("4.0", "3.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sd3")
    ap.add_argument("--root", default="outputs/groups")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root)
    results: dict[str, Any] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    evalset = None
    for name, patterns in DEFINITIONS.items():
        run = RunDir(root / name.replace(" ", "_").replace("+", "and"))
        code = mpq_main(
            [
                "select",
                "--config",
                args.config,
                "--outdir",
                str(run.root),
                f"groups.content=[{','.join(patterns)}]",
                f"search.weight.target_bitwidth={TARGETS[0]}",
                f"search.weight.budgets=[{','.join(TARGETS[1:])}]",
                *args.overrides,
            ]
        )
        if code:
            raise SystemExit(code)
        cfg = run.load_config()
        pipe, qm, _ = quantized_pipeline(cfg, run)
        rows = read_records(run.selection / "weight_budgets.csv", BudgetBest, "re-run the benchmark")
        plans = {f"W{r.budget}": BitPlan(read_plan(run.scored_plan("weight", r.plan_file))) for r in rows}
        if evalset is None:
            evalset = eval_set(cfg, run, pipe, Path(tempfile.mkdtemp(prefix="mpq-groups-fp-")))
        scores, per_image[name] = {}, {}
        for label, plan in plans.items():
            qm.apply(plan)
            images = generate(pipe, evalset.prompts, evalset.seeds, cfg, desc=f"eval: {name} {label}")
            qm.set_fp()
            scores[label] = score_images(images, evalset.refs, evalset.prompts)
            per_image[name][label] = image_mse(to_array(images), evalset.refs)
        content = sum(g == CONTENT for g in assign_groups(qm.names, patterns, warn=False).values())
        results[name] = {
            "patterns": patterns,
            "content_layers": content,
            "plans": {
                label: {
                    "plan_file": r.plan_file,
                    "bytes": r.bytes,
                    "avg_bits": r.avg_bits,
                    "selection_mse": r.mse,
                    **{k: v for k, v in scores[label].items() if k != "adherence"},
                    "adherence": (scores[label]["adherence"] or {}).get("all"),
                }
                for label, r in zip(plans, rows)
            },
        }
    print("\n| content group | " + " | ".join(f"W{t} bytes | W{t} MSE | W{t} adherence" for t in TARGETS) + " |")
    print("|---|" + "---|---|---|" * len(TARGETS))
    for name, res in results.items():
        cells = []
        for t in TARGETS:
            p = res["plans"][f"W{t}"]
            adh = "n/a" if p["adherence"] is None else f"{p['adherence']:.0%}"
            cells.append(f"{p['bytes']:,.0f} | {p['mse']:.3e} | {adh}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # one number per definition: the geometric mean over the targets of its MSE / the best MSE at that target, with
    # a paired bootstrap over the evaluation images (the same prompts and seeds for every plan)
    rng = np.random.default_rng(0)
    n = len(next(iter(per_image.values()))[f"W{TARGETS[0]}"])
    draws = [rng.integers(0, n, n) for _ in range(2000)]

    def geo_ratio(name: str, idx: np.ndarray | None) -> float:
        logs = []
        for t in TARGETS:
            mse = {d: (v[f"W{t}"] if idx is None else v[f"W{t}"][idx]).mean() for d, v in per_image.items()}
            logs.append(np.log(mse[name] / min(mse.values())))
        return float(np.exp(np.mean(logs)))

    ranked = sorted(per_image, key=lambda d: geo_ratio(d, None))
    best = ranked[0]
    print(f"\n| content group | geometric mean of MSE / best over W{' and W'.join(TARGETS)} | vs {best} (95% CI) |")
    print("|---|---|---|")

    def vs_best(d: str, idx: np.ndarray) -> float:
        logs = [np.log(per_image[d][f"W{t}"][idx].mean() / per_image[best][f"W{t}"][idx].mean()) for t in TARGETS]
        return float(np.exp(np.mean(logs)))

    for d in ranked:
        ratios = [vs_best(d, i) for i in draws]
        point = vs_best(d, np.arange(n))
        lo, hi = np.percentile(ratios, [2.5, 97.5])
        results[d]["geo_ratio_to_best"] = geo_ratio(d, None)
        results[d]["vs_best"] = {"ratio": float(point), "ci95": [float(lo), float(hi)]}
        print(f"| {d} | {geo_ratio(d, None):.3f} | {point:.3f} ({lo:.3f}-{hi:.3f}) |")
    for d in per_image:
        for label, v in per_image[d].items():
            results[d]["plans"][label]["mse_per_image"] = v.tolist()
    out = root / "content_groups.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_with(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
