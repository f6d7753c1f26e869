"""Selection: generate images with each candidate plan, rank by MSE against the FP images.

Weights first (activations FP), then every activation candidate on top of the
chosen weight plan. SSIM, PSNR and (for the embedded shapes model) prompt
adherence are recorded beside MSE so a user can see whether another metric
would choose differently. Ties (equal MSE) go to the higher adherence, then to
the smaller plan, then to the file name: deterministic.

Writes ``selection/{weight,act}_scores.csv``, ``selection/final_{weight,act}.yaml``
(+ ``final_act_protect.pt``) and each candidate's images under
``selection/images/<kind>/<plan>/``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image
from mpq.progress import progress as tqdm

from mpq.calib import calib_prompts, fp_image_paths
from mpq.errors import MpqError
from mpq.generate import generate, save_images, to_array
from mpq.infer import quantized_pipeline
from mpq.io import read_csv, read_json, write_csv, write_json
from mpq.evaluate import score_images
from mpq.plan import BitPlan, read_layer_list, read_plan, validate_plan, write_layer_list, write_plan
from mpq.rundir import RunDir

SCORE_COLUMNS = ("plan_file", "kind", "mse", "ssim", "psnr", "adherence", "avg_bits", "bytes", "chosen")


def candidate_files(run: RunDir, kind: str, pareto_only: bool) -> list[str]:
    """Distinct plan files of ``kind`` from candidates/pareto.csv, in file-name order."""
    table = run.require("candidates/pareto.csv", f"run `mpq search --base_path {run.root}` first")
    rows = read_csv(table)
    files = sorted({r["plan_file"] for r in rows if r["kind"] == kind and r["plan_file"] and (r["pareto"] == "True" or not pareto_only)})
    if not files:
        raise MpqError(f"{table} lists no {kind} plans; re-run the search with a feasible budget")
    return files


def rank(scores: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Plan files best first: lowest MSE; ties to higher adherence (when measured), fewer bytes, then the file name."""
    return sorted(scores, key=lambda f: (round(scores[f]["mse"], 12), -scores[f].get("adherence", 0.0), scores[f]["bytes"], f))


def run_selection(cfg: DictConfig, run: RunDir, pipe: Any | None = None, progress: bool = True) -> dict[str, Any]:
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    bits = list(manifest["bits"])
    prompts, seeds = calib_prompts(run)
    n = min(cfg.select.num_images, len(prompts))
    refs = to_array([Image.open(p) for p in fp_image_paths(run, n)])
    out = run.root / "selection"
    partial_path = out / ".scores.partial.json"
    sig = hashlib.sha256(f"{n}|{seeds[:n]}|{run.ckpt.stat().st_mtime_ns}|{(run.root / 'candidates' / 'pareto.csv').read_text()}".encode()).hexdigest()
    partial: dict[str, Any] = read_json(partial_path) if partial_path.is_file() else {}
    if partial.get("_signature") != sig:
        partial = {"_signature": sig}
    table = {r["plan_file"]: r for r in read_csv(run.root / "candidates" / "pareto.csv")}
    protect_path = run.root / "candidates" / "act_protect.pt"
    protect = read_layer_list(protect_path) if protect_path.is_file() else []
    chosen: dict[str, str] = {}
    final = BitPlan()  # the chosen weight plan, set when the weight pass ends; the act pass scores on top of it
    result: dict[str, Any] = {}
    try:
        for kind in ("weight", "act"):
            files = candidate_files(run, kind, cfg.select.pareto_only)
            scores: dict[str, dict[str, float]] = {}
            plans: dict[str, dict[str, int]] = {}
            for f in tqdm(files, desc=f"select: {kind} candidates", unit="plan", disable=not progress):
                key = f"{kind}/{f}" + (f"@{chosen['weight']}" if kind == "act" else "")
                plan = plans[f] = read_plan(run.root / "candidates" / kind / f)
                validate_plan(plan, qm.names, bits, f)
                if key not in partial:
                    trial = BitPlan(plan) if kind == "weight" else BitPlan(final.weight, plan).protect(protect, cfg.search.protect_weights)
                    qm.apply(trial.weight, trial.act)
                    images = generate(pipe, prompts[:n], seeds[:n], cfg)
                    folder = out / "images" / kind / Path(f).stem
                    shutil.rmtree(folder, ignore_errors=True)
                    save_images(images, folder)
                    scored = score_images(images, refs, prompts[:n])
                    adh = scored.pop("adherence")
                    partial[key] = dict(scored, **({"adherence": adh["all"]} if adh else {}))
                    write_json(partial_path, partial)
                row = table.get(f, {})
                scores[f] = dict(partial[key], avg_bits=float(row.get("avg_bits", "nan")), bytes=float(row.get("bytes", "nan")))
            ranked = rank(scores)
            best = chosen[kind] = ranked[0]
            if kind == "weight":
                final = BitPlan(plans[best])
            write_csv(out / f"{kind}_scores.csv", [
                {"plan_file": f, "kind": kind, **{k: f"{scores[f][k]:.8g}" for k in ("mse", "ssim", "psnr", "avg_bits", "bytes")},
                 "adherence": f"{scores[f]['adherence']:.4f}" if "adherence" in scores[f] else "", "chosen": f == best}
                for f in ranked], SCORE_COLUMNS)
            write_plan(out / f"final_{kind}.yaml", plans[best])
            result[kind] = {"plan_file": best, **scores[best]}
        write_layer_list(out / "final_act_protect.pt", protect)
    finally:
        qm.set_fp()
    partial_path.unlink(missing_ok=True)
    return result
