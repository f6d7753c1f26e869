"""Selection: generate images with each candidate plan, rank by MSE against the FP images.

Weights first (activations FP), then every activation candidate on top of the
chosen weight plan. The chosen plan of a kind is the best one within its
target budget (``search.<kind>.target_bitwidth``: the candidate family may span
every budget); for each named budget (the target and ``search.<kind>.budgets``)
``selection/<kind>_budgets.csv`` gives the best plan at no more bytes. SSIM,
PSNR and (for the embedded shapes model) prompt adherence are recorded beside
MSE so a user can see whether another metric would choose differently. Ties
(equal MSE) go to the higher adherence, then to the smaller plan, then to the
file name: deterministic.

Writes ``selection/{weight,act}_scores.csv``, ``selection/final_{weight,act}.yaml``
(+ ``final_act_protect.pt``: the plan exactly as it ran) and each candidate's
images under ``selection/images/<kind>/<plan>/``. Resumable and sharded over
torchrun ranks (items: plans, :class:`~mpq.runner.sharded.ShardedWork`).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.errors import MpqError
from mpq.images import PromptEmbeddings, generate, save_images
from mpq.plan import FORMATS_SUFFIX, BitPlan, plan_file_name, read_plan, write_plan
from mpq.quant.model import QuantModel
from mpq.report.evaluate import calibration_set, score_images
from mpq.runner import distributed
from mpq.runner.choices import KINDS
from mpq.runner.config import AUTO, target_bits
from mpq.runner.files import file_digest, read_json, read_records, write_json, write_layer_list, write_records
from mpq.runner.progress import progress
from mpq.runner.rundir import RunDir, is_refined, refined_prefix
from mpq.runner.sharded import ShardedWork, run_sharded, stage_signature
from mpq.runner.specs import SELECT
from mpq.search.candidates import Candidate, candidate_plans, read_candidates


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


def write_scores(path: Path, rows: list[Score]) -> None:
    write_records(path, rows, Score, digits=8)


def read_scores(path: str | Path) -> list[Score]:
    return read_records(path, Score, "delete it and re-run `mpq select`")


@dataclass
class BudgetBest:
    """The best scored plan at no more than a named budget (a row of ``selection/<kind>_budgets.csv``)."""

    kind: str
    budget: str  # as named: average bits (4.0) or bytes with a unit (750KB)
    budget_bytes: float
    plan_file: str  # '' when no candidate fits
    mse: float
    ssim: float
    psnr: float
    avg_bits: float
    bytes: float


def named_budgets(cfg: DictConfig, run: RunDir, kind: str) -> list[tuple[str, float]]:
    """(name, bytes) of the target budget and every ``search.<kind>.budgets`` entry, the target first.

    In MixDQ's reference mode a budget in average bits holds within ``search.band`` (each group's program keeps its
    share to +-band, as MixDQ's does), so its limit is the bytes at ``bits + band``."""
    from mpq.runner.config import parse_bytes
    from mpq.search.build import budget_for_avg, run_problem

    problem = run_problem(cfg, run, kind)[0]
    kc = cfg.search[kind]
    slack = float(cfg.search.band) if cfg.search.mode == "reference" else 0.0
    target = target_bits(cfg.search, kind, problem.avg_range()[1])
    return [(str(kc.target_bitwidth), budget_for_avg(problem, target + slack))] + [
        (str(b), parse_bytes(b) if isinstance(b, str) else budget_for_avg(problem, float(b) + slack))
        for b in kc.budgets
    ]


def measured_target(cfg: DictConfig, kind: str) -> bool:
    """Is the kind's budget chosen by measurement (``target_bitwidth: auto`` in mpq mode)?"""
    return bool(cfg.search[kind].target_bitwidth == AUTO and cfg.search.mode == "mpq")


def choose(ranked: list[Score], limit: float, measured: bool = False) -> Score | None:
    """The chosen plan of ``ranked`` (best first): the best within ``limit`` bytes; ``measured``: the fewest bytes
    within it whose MSE is no worse than the reference, the plan with the most bytes (every layer at the most bits:
    uniform A8), ties to the better MSE."""
    within = [r for r in ranked if r.bytes <= limit * (1 + 1e-9)]
    if not within or not measured:
        return within[0] if within else None
    ref = reference_of(within)
    return min((r for r in within if r.mse <= ref.mse), key=lambda r: (r.bytes, within.index(r)))


def reference_of(rows: list[Score]) -> Score:
    """The plan a measured budget must not lose to: the one with the most bytes (ties: the first)."""
    return max(rows, key=lambda r: (r.bytes, -rows.index(r)))


@dataclass
class CurvePoint:
    """A point of what each budget costs (a row of ``selection/<kind>_curve.csv``): the best scored plan at no more
    than these bytes, where it improves on every smaller one; its MSE against the reference's (the most bytes)."""

    kind: str
    avg_bits: float
    bytes: float
    plan_file: str
    mse: float
    vs_reference: float
    chosen: bool


def budget_curve(kind: str, ranked: list[Score]) -> list[CurvePoint]:
    """The lower envelope of MSE against bytes: at any budget the best plan is the last point at no more bytes."""
    if not ranked:
        return []
    ref = reference_of(ranked)
    out: list[CurvePoint] = []
    for r in sorted(ranked, key=lambda r: (r.bytes, ranked.index(r))):
        if not out or r.mse < out[-1].mse:
            vs = r.mse / ref.mse if ref.mse > 0 else math.nan
            out.append(CurvePoint(kind, r.avg_bits, r.bytes, r.plan_file, r.mse, vs, r.chosen))
    return out


def budget_table(
    kind: str, ranked: list[Score], budgets: list[tuple[str, float]], measured: bool = False
) -> list[BudgetBest]:
    """The best plan at each named budget; the target's (the first) as chosen (``measured``: see :func:`choose`)."""
    rows = []
    for i, (name, limit) in enumerate(budgets):
        r = choose(ranked, limit, measured and i == 0)
        nan = math.nan
        rows.append(
            BudgetBest(kind, name, limit, r.plan_file, r.mse, r.ssim, r.psnr, r.avg_bits, r.bytes)
            if r
            else BudgetBest(kind, name, limit, "", nan, nan, nan, nan, nan)
        )
    return rows


def rank(scores: list[Score]) -> list[Score]:
    """Best first: lowest MSE; ties to higher adherence (when measured), fewer bytes, then the file name."""
    return sorted(
        scores,
        key=lambda r: (round(r.mse, 12), -(0.0 if math.isnan(r.adherence) else r.adherence), r.bytes, r.plan_file),
    )


@dataclass
class _Session:
    """What scoring a candidate needs: the run, its quantized pipeline, the selection prompts, seeds and FP
    references."""

    cfg: DictConfig
    run: RunDir
    pipe: Any
    qm: QuantModel
    prompts: list[str]
    seeds: list[int]
    refs: np.ndarray
    text: PromptEmbeddings | None = None  # the selection prompts, encoded once for every candidate


def open_session(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> _Session:
    """The run's quantized pipeline with selection's prompts, seeds and FP references (the first
    ``select.num_images`` calibration images), prompts encoded once."""
    pipe, qm, _ = quantized_pipeline(cfg, run, pipe)
    images = calibration_set(run, cfg.select.num_images, "select.num_images")
    return _Session(cfg, run, pipe, qm, images.prompts, images.seeds, images.refs, PromptEmbeddings(pipe, cfg))


def plan_mse(s: _Session, plan: BitPlan) -> float:
    """Selection's objective for one plan: the mean image MSE of its selection images against FP (nothing saved)."""
    s.qm.apply(plan)
    try:
        generated = generate(s.pipe, s.prompts, s.seeds, s.cfg, text=s.text)
    finally:
        s.qm.set_fp()
    return float(score_images(generated, s.refs)["mse"])


def _trial(kind: str, plan: BitPlan, weight: BitPlan | None, protect_weights: bool) -> BitPlan:
    """The plan that runs for a candidate: a weight candidate alone (activations FP), or an act candidate on top of
    the chosen ``weight`` plan; with ``protect_weights`` the act-protected layers' weights stay FP too (made here,
    once)."""
    if weight is None:
        return plan
    return BitPlan(weight.weight, plan.act).protect(plan.protected, protect_weights)


def _as_data(plan: BitPlan | None) -> list[Any] | None:
    """A plan as plain sorted data (for a signature: the same in every process)."""
    return None if plan is None else [sorted(plan.weight.items()), sorted(plan.act.items()), sorted(plan.protected)]


def _score_one(s: _Session, kind: str, name: str, plan: BitPlan) -> dict[str, float]:
    s.qm.apply(plan)
    generated = generate(s.pipe, s.prompts, s.seeds, s.cfg, text=s.text)
    folder = s.run.selection_images(kind, name)
    shutil.rmtree(folder, ignore_errors=True)
    save_images(generated, folder)
    scored = score_images(generated, s.refs, s.prompts)
    adh = scored.pop("adherence")
    return dict(scored, adherence=adh["all"] if adh else math.nan)


def _score_kind(
    s: _Session,
    kind: str,
    plans: dict[str, BitPlan],
    rows: dict[str, Candidate],
    weight: BitPlan | None,
    sig: str,
    show: bool,
    force: bool,
    limit: float = math.inf,
    measured: bool = False,
) -> list[Score]:
    """Every ``kind`` candidate scored (this rank's share, resumed from partial files), merged, ranked best first, the
    best within ``limit`` bytes marked chosen; a score table finished with the same signature is read back unless
    ``force``."""
    table = s.run.scores(kind)
    work = ShardedWork.of(table, sig, list(plans))  # every plan costs the same (the same images)

    def compute() -> dict[str, dict[str, float]]:
        todo = [f for f in work.mine if f not in work.state]
        for f in progress(todo, desc=f"select: {kind} candidates", unit="plan", disable=not show):
            work.state[f] = _score_one(s, kind, f, _trial(kind, plans[f], weight, s.cfg.search.protect_weights))
            work.save()
        return work.state

    def read() -> list[Score] | None:
        done = read_scores(table)
        return done if {r.plan_file for r in done if not is_refined(kind, r.plan_file)} == set(plans) else None

    return run_sharded(
        work,
        table,
        compute=compute,
        result=lambda merged: ranked_scores(kind, list(plans), merged, rows, limit, measured),
        write=lambda ranked: write_scores(table, ranked),
        read=read,
        force=force,
        resumed=lambda saved: f"[select] {kind}: resuming, {len(saved)} of {len(plans)} plans already scored",
        label=f"[select] {kind}",
        unit="plans",
    )


def ranked_scores(
    kind: str,
    plan_files: list[str],
    merged: dict[str, dict[str, float]],
    rows: dict[str, Candidate],
    limit: float,
    measured: bool = False,
) -> list[Score]:
    """The scores of ``plan_files`` ranked best first, the one :func:`choose` picks within ``limit`` bytes marked
    chosen (pure)."""
    ranked = rank(
        [
            Score(
                f,
                kind,
                merged[f]["mse"],
                merged[f]["ssim"],
                merged[f]["psnr"],
                merged[f]["adherence"],
                rows[f].avg_bits,
                rows[f].bytes,
            )
            for f in plan_files
        ]
    )
    chosen = choose(ranked, limit, measured)
    if chosen is None:
        check_fits(kind, [r.bytes for r in ranked], limit)
    assert chosen is not None
    chosen.chosen = True
    return ranked


def check_fits(kind: str, plan_bytes: list[float], limit: float) -> None:
    """Refuse a target budget no candidate plan meets (decidable from the candidate table, so checked before any
    image is generated)."""
    if not any(b <= limit * (1 + 1e-9) for b in plan_bytes):
        smallest = min(plan_bytes)
        raise MpqError(
            f"no {kind} candidate fits the target budget ({limit:,.0f} bytes; the smallest is {smallest:,.0f}); raise "
            f"search.{kind}.target_bitwidth or re-run the search"
        )


def refine_problem(cfg: DictConfig, run: RunDir, plan: dict[str, Any]) -> Any:
    """The weight problem a plan is refined in: the configured groups', or every candidate on every layer where the
    plan already uses more (a plan of the sweep below the groups' fewest bits)."""
    from mpq.search.build import run_problem

    problem = run_problem(cfg, run, "weight")[0]
    if all(plan[n] in problem.bits[i] for i, n in enumerate(problem.names) if problem.bits[i]):
        return problem
    return run_problem(cfg, run, "weight", every_bit=True)[0]


def refine_plan(
    s: _Session, problem: Any, start: dict[str, Any], start_mse: float, limit: float, show: bool = True
) -> Any:
    """:func:`mpq.search.refine.refine` from ``start`` (its selection MSE ``start_mse``) within ``limit`` bytes, each
    move scored by selection's objective (:func:`plan_mse`, activations FP); ``select.refine_*`` set the effort."""
    from mpq.search.refine import refine

    evals, per_round = int(s.cfg.select.refine_evals), int(s.cfg.select.refine_per_round)
    bar = progress(total=evals, desc="select: refine weight plan", unit="plan", disable=not show)
    d = distributed.current()

    def objective(plan: dict[str, Any]) -> float:
        return plan_mse(s, BitPlan(plan))

    def many(plans: list[dict[str, Any]]) -> list[float]:
        """A round's plans, shared out over the torchrun ranks (every rank gets every value, so every rank takes
        the same move)."""
        mine = {i: objective(p) for i, p in enumerate(plans) if i % d.world == d.rank}
        merged: dict[int, float] = {}
        for part in d.gather(mine):
            merged.update(part)
        bar.update(len(plans))
        return [merged[i] for i in range(len(plans))]

    try:
        return refine(problem, start, limit, objective, evals, per_round, start_value=start_mse, many=many)
    finally:
        bar.close()


def _refine_chosen(
    s: _Session,
    ranked: list[Score],
    plans: dict[str, BitPlan],
    limit: float,
    measured: bool,
    sig: str,
    show: bool,
    force: bool,
) -> tuple[list[Score], dict[str, BitPlan]]:
    """The weight ranking with the chosen plan refined (:func:`refine_plan`): when the search improves on it, the
    refined plan (``selection/weight_refined_<start>``) is added, scored like every candidate, and chosen.
    Within the target budget (measured: within the chosen plan's bytes). Resumed from ``selection/weight_refine.json``
    when its signature matches. Returns (ranked, {refined file: plan})."""
    import hashlib
    import time

    kind, run, cfg = "weight", s.run, s.cfg
    ranked = [r for r in ranked if not is_refined(kind, r.plan_file)]  # a table read back has it: made again below
    for r in ranked:
        r.chosen = False
    start = choose(ranked, limit, measured)
    assert start is not None
    start.chosen = True
    limit = start.bytes if measured else limit
    key = [sig, start.plan_file, start.mse, limit, cfg.select.refine_evals, cfg.select.refine_per_round]
    signature = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    log = run.refine_log(kind)
    data = read_json(log) if log.is_file() and not force else None
    if data is not None and (
        data.get("signature") != signature
        or (data["plan_file"] and not run.scored_plan(kind, data["plan_file"]).is_file())
    ):
        data = None
    if data is None:  # every rank searches (each scores its share of a round's moves); the main one writes
        t0 = time.perf_counter()
        base = plans[start.plan_file].weight
        problem = refine_problem(cfg, run, base)
        r = refine_plan(s, problem, base, start.mse, limit, show)
        data = {
            "signature": signature,
            "start": start.plan_file,
            "start_mse": start.mse,
            "limit_bytes": limit,
            "evals": r.evals,
            "mse": r.value,
            "plan_file": "",
            "trail": [{"move": m, "mse": v, "bytes": b} for m, v, b in r.trail],
        }
        if r.improved and distributed.current().is_main:
            stem = start.plan_file.removesuffix(FORMATS_SUFFIX).removesuffix(".yaml")[len(kind) + 1 :]
            name = plan_file_name(f"{refined_prefix(kind)}{stem}", r.plan)
            write_plan(run.scored_plan(kind, name), r.plan)
            scored = _score_one(s, kind, name, BitPlan(r.plan))
            data.update(plan_file=name, score=scored, avg_bits=problem.avg_bits(r.plan))
            data["bytes"] = problem.plan_bytes(r.plan)
        data["seconds"] = time.perf_counter() - t0
        if distributed.current().is_main:
            write_json(log, data)
    data = distributed.current().broadcast(data)
    if not data["plan_file"]:
        return ranked, {}
    name, sc = data["plan_file"], data["score"]
    row = Score(name, kind, sc["mse"], sc["ssim"], sc["psnr"], sc["adherence"], data["avg_bits"], data["bytes"])
    start.chosen, row.chosen = False, True
    ranked = rank([*ranked, row])
    if distributed.current().is_main:
        write_scores(run.scores(kind), ranked)
    return ranked, {name: BitPlan(read_plan(run.scored_plan(kind, name)))}


def refine_summary(run: RunDir, kind: str = "weight") -> dict[str, Any] | None:
    """What the refinement did (``selection/<kind>_refine.json``: start, MSEs, evaluations, plan file, seconds, and
    the accepted moves and MSE ratio derived), or None (off)."""
    log = run.refine_log(kind)
    if not log.is_file():
        return None
    d = read_json(log)
    out = {k: d[k] for k in ("start", "start_mse", "mse", "evals", "plan_file", "seconds")}
    out["moves"] = len(d["trail"]) - 1
    out["ratio"] = d["mse"] / d["start_mse"] if d["start_mse"] > 0 else math.nan
    return out


def refine_line(ref: dict[str, Any]) -> str:
    """One line on a refinement (:func:`refine_summary`), for the stage's summary."""
    if not ref["plan_file"]:
        return f"  refined: no better plan in {ref['evals']} evaluations; kept {ref['start']}"
    return (
        f"  refined from {ref['start']}: {ref['moves']} moves in {ref['evals']} evaluations ({ref['seconds']:.0f} s), "
        f"selection MSE {ref['start_mse']:.6g} -> {ref['mse']:.6g} ({ref['ratio']:.2f}x)"
    )


def _drop_refined(run: RunDir, kind: str) -> None:
    """Remove an earlier refinement's log and plan (refinement now off)."""
    run.refine_log(kind).unlink(missing_ok=True)
    for p in run.selection.glob(f"{refined_prefix(kind)}*.yaml"):
        p.unlink()


def run_selection(
    cfg: DictConfig, run: RunDir, pipe: Any | None = None, show: bool = True, force: bool = False
) -> dict[str, Score]:
    """Score every weight candidate (activations FP), then every act candidate on top of the chosen weight plan;
    write the final plan exactly as it ran."""
    table = run.require(run.candidate_table, f"run `mpq search --base_path {run.root}` first")
    rows = read_candidates(table)
    by_file = {r.plan_file: r for r in rows if r.feasible}
    # every kind's plans and budgets, checked before the model is loaded or any image made
    kind_plans = {kind: candidate_plans(run, rows, kind, cfg.select.pareto_only) for kind in KINDS}
    kind_budgets = {kind: named_budgets(cfg, run, kind) for kind in KINDS}
    for kind, plans in kind_plans.items():
        if not plans:
            raise MpqError(f"{table} lists no {kind} plans; re-run the search with a feasible budget")
        check_fits(kind, [by_file[f].bytes for f in plans], kind_budgets[kind][0][1])
    session = open_session(cfg, run, pipe)
    qm, n = session.qm, len(session.prompts)
    # the inputs the scores depend on besides the stage's config keys (protect_weights, sampling, ...: SELECT's)
    base = {"n": n, "seeds": session.seeds, "ckpt": file_digest(run.ckpt), "candidates": file_digest(table)}
    chosen: dict[str, Score] = {}
    final: BitPlan | None = None
    try:
        for kind in KINDS:
            plans, budgets = kind_plans[kind], kind_budgets[kind]
            for f, plan in plans.items():
                plan.validate(qm.names, qm.bits, f, qm.formats)
            # what the scores depend on: every input above, and the plans themselves (as they will run)
            plan_sig = {
                f: [sorted(p.weight.items()), sorted(p.act.items()), sorted(p.protected)] for f, p in plans.items()
            }
            measured = measured_target(cfg, kind)
            sig = stage_signature(
                SELECT, cfg, **base, kind=kind, plans=plan_sig, weight=repr(final), limit=budgets[0][1]
            )
            ranked = _score_kind(session, kind, plans, by_file, final, sig, show, force, budgets[0][1], measured)
            if kind == "weight" and cfg.search.mode == "mpq" and cfg.select.refine_evals > 0:
                ranked, refined = _refine_chosen(session, ranked, plans, budgets[0][1], measured, sig, show, force)
                plans = {**plans, **refined}
            elif distributed.current().is_main:
                _drop_refined(run, kind)
            chosen[kind] = next(r for r in ranked if r.chosen)
            final = _trial(kind, plans[chosen[kind].plan_file], final, cfg.search.protect_weights)
            if distributed.current().is_main:
                write_records(run.budgets(kind), budget_table(kind, ranked, budgets, measured), BudgetBest)
                write_records(run.curve(kind), budget_curve(kind, ranked), CurvePoint)
    finally:
        qm.set_fp()
    if final is not None and distributed.current().is_main:
        write_plan(run.final_weight, final.weight)
        write_plan(run.final_act, final.act)
        write_layer_list(run.final_protect, sorted(final.protected))
    return chosen
