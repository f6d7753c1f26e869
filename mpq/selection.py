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
import math
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mpq import distributed
from mpq.calib import calib_prompts, fp_image_paths
from mpq.candidates import candidate_plans, read_candidates
from mpq.errors import MpqError
from mpq.evaluate import score_images
from mpq.files import read_csv, read_json, write_csv, write_json
from mpq.generate import generate, load_images, save_images, to_array
from mpq.infer import quantized_pipeline
from mpq.plan import BitPlan, read_layer_list, read_plan, write_layer_list, write_plan
from mpq.progress import progress
from mpq.rundir import RunDir

KINDS = ("weight", "act")


@dataclass
class Score:
    """One candidate plan's images scored against FP (a row of ``selection/<kind>_scores.csv``)."""

    plan_file: str
    kind: str
    mse: float
    ssim: float
    psnr: float
    adherence: float  # nan when the prompts have no adherence judge
    avg_bits: float
    bytes: float
    chosen: bool = False


SCORE_COLUMNS = tuple(f.name for f in fields(Score))


def write_scores(path: Path, rows: list[Score]) -> None:
    write_csv(path, [{c: (f"{getattr(r, c):.8g}" if isinstance(getattr(r, c), float) else getattr(r, c)) for c in SCORE_COLUMNS} for r in rows],
              SCORE_COLUMNS)


def read_scores(path: str | Path) -> list[Score]:
    rows = read_csv(path)
    if not rows or any(c not in rows[0] for c in SCORE_COLUMNS):
        raise MpqError(f"{path}: not a selection score table; delete it and re-run `mpq select`")
    try:
        return [Score(r["plan_file"], r["kind"], *(float(r[c] or "nan") for c in SCORE_COLUMNS[2:-1]), chosen=r["chosen"] == "True") for r in rows]
    except ValueError:
        raise MpqError(f"{path}: a score is not a number; delete it and re-run `mpq select`") from None


def rank(scores: list[Score]) -> list[Score]:
    """Best first: lowest MSE; ties to higher adherence (when measured), fewer bytes, then the file name."""
    return sorted(scores, key=lambda r: (round(r.mse, 12), -(0.0 if math.isnan(r.adherence) else r.adherence), r.bytes, r.plan_file))


def final_plan(run: RunDir, protect_weights: bool = False) -> BitPlan:
    """The selected plan: ``selection/final_{weight,act}.yaml`` and ``final_act_protect.pt`` (MixDQ's files)."""
    sel = run.root / "selection"
    hint = f"run `mpq select --base_path {run.root}` first"
    plan = BitPlan(read_plan(run.require("selection/final_weight.yaml", hint)), read_plan(run.require("selection/final_act.yaml", hint)))
    protect = sel / "final_act_protect.pt"
    return plan.protect(read_layer_list(protect), protect_weights) if protect.is_file() else plan


def run_selection(cfg: DictConfig, run: RunDir, pipe: Any | None = None, show: bool = True) -> dict[str, Score]:
    """Score every weight candidate (activations FP), then every act candidate on top of the chosen weight plan."""
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    prompts, seeds = calib_prompts(run)
    n = min(cfg.select.num_images, len(prompts))
    refs = to_array(load_images(fp_image_paths(run, n), f"re-run `mpq calib --force --base_path {run.root}`"))
    out = run.root / "selection"
    table_path = run.require("candidates/pareto.csv", f"run `mpq search --base_path {run.root}` first")
    rows = read_candidates(table_path)
    d = distributed.current()
    partial_path = out / (f".scores.partial.rank{d.rank}.json" if d.enabled else ".scores.partial.json")
    sig = hashlib.sha256(f"{n}|{seeds[:n]}|{run.ckpt.stat().st_mtime_ns}|{table_path.read_text()}|{cfg.search.protect_weights}".encode()).hexdigest()
    partial: dict[str, Any] = {"_signature": sig}
    for f in sorted(out.glob(".scores.partial*.json")):  # this process's, or every rank's of a distributed job
        try:
            loaded = read_json(f)
        except MpqError:  # a damaged partial file (its writes are atomic, so only by hand): score again
            continue
        if isinstance(loaded, dict) and loaded.get("_signature") == sig:
            partial.update(loaded)
    by_file = {r.plan_file: r for r in rows if r.feasible}
    chosen: dict[str, Score] = {}
    plans: dict[str, dict[str, BitPlan]] = {}
    try:
        for kind in KINDS:
            plans[kind] = candidate_plans(run.root / "candidates", rows, kind, cfg.select.pareto_only)
            if not plans[kind]:
                raise MpqError(f"{table_path} lists no {kind} plans; re-run the search with a feasible budget")
            scores = []
            for f, plan in plans[kind].items():
                plan.validate(qm.names, manifest["bits"], f)
            keys = {f: f"{kind}/{f}" + (f"@{chosen['weight'].plan_file}" if kind == "act" else "") for f in plans[kind]}
            # every plan costs the same (the same images): sharded evenly, each plan scored whole by one rank
            owner = distributed.assign(dict.fromkeys(plans[kind], 1.0), d.world)
            mine = [f for f in plans[kind] if owner[f] == d.rank and keys[f] not in partial]
            t0 = time.perf_counter()
            for f in progress(mine, desc=f"select: {kind} candidates", unit="plan", disable=not show):
                plan = plans[kind][f]
                trial = plan if kind == "weight" else plans["weight"][chosen["weight"].plan_file].with_act(plan.act)
                trial = trial.protect(plan.protected, cfg.search.protect_weights)
                qm.apply(trial.weight, trial.act)
                images = generate(pipe, prompts[:n], seeds[:n], cfg)
                folder = out / "images" / kind / Path(f).stem
                shutil.rmtree(folder, ignore_errors=True)
                save_images(images, folder)
                scored = score_images(images, refs, prompts[:n])
                adh = scored.pop("adherence")
                partial[keys[f]] = dict(scored, adherence=adh["all"] if adh else math.nan)
                write_json(partial_path, partial)
            if d.enabled:
                merged, report = d.collect({keys[f]: partial[keys[f]] for f in plans[kind] if owner[f] == d.rank}, time.perf_counter() - t0,
                                           owner, dict.fromkeys(owner, 1.0))
                partial.update(merged)
                if report is not None:
                    print(f"[select] {kind}: {len(plans[kind])} plans over {d.world} ranks: {distributed.load_line(report, 'plans')}", flush=True)
            for f in plans[kind]:
                key = keys[f]
                row = by_file[f]
                scores.append(Score(f, kind, partial[key]["mse"], partial[key]["ssim"], partial[key]["psnr"], partial[key]["adherence"],
                                    row.avg_bits, row.bytes))
            ranked = rank(scores)
            ranked[0].chosen = True
            chosen[kind] = ranked[0]
            if d.is_main:
                write_scores(out / f"{kind}_scores.csv", ranked)
        weight, act = plans["weight"][chosen["weight"].plan_file], plans["act"][chosen["act"].plan_file]
        if d.is_main:
            write_plan(out / "final_weight.yaml", weight.weight)
            write_plan(out / "final_act.yaml", act.act)
            write_layer_list(out / "final_act_protect.pt", sorted(act.protected))
    finally:
        qm.set_fp()
    d.barrier()
    if d.is_main:
        for f in out.glob(".scores.partial*.json"):
            f.unlink(missing_ok=True)
    return chosen
