"""The search stage: a sweep of budgets x K through the solver, one plan file per distinct plan.

Writes ``candidates/{weight,act}/<kind>_<target>_<K>.yaml`` (MixDQ plan files),
``candidates/act_protect.pt`` (+ ``.txt``) and the typed table
``candidates/pareto.csv`` (:mod:`mpq.search.candidates`). Plots belong to the report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.plan import plan_file_name, write_plan
from mpq.runner.choices import KINDS
from mpq.runner.config import parse_bytes, target_bits
from mpq.runner.progress import progress
from mpq.runner.rundir import RunDir
from mpq.search.build import budget_for_avg, run_problem, write_protect_list
from mpq.search.candidates import RULE, UNIFORM, Candidate, write_candidates
from mpq.search.program import Problem, Solution, solve_mpq, solve_reference


def sweep_values(start: float, stop: float, num: int) -> list[float]:
    return [round(float(v), 4) for v in np.linspace(start, stop, num)] if num > 1 else [round(float(stop), 4)]


def sweep_grid(
    s: Any, kind: str, target: float | None = None, problem: Problem | None = None, below: Problem | None = None
) -> tuple[list[float], list[float]]:
    """(average-bit targets, K values) of a sweep; K: linspace(k_min, k_max, k_num). Targets: with
    ``search.sweep: full`` and a ``problem``, the whole feasible range of average bits (the smallest to the largest
    candidate bits of the kind's groups; from the fewest of ``below``, the same layers with every bit allowed, when
    given) every ``search.sweep_density`` bits, plus the target and every named budget
    (``search.<kind>.budgets``) inside it, and in mpq mode K free (``inf``: no ratio constraint; only it reaches the
    ends, where both groups sit at their fewest or most bits); else MixDQ's linspace(target - sweep_span, target,
    sweep_steps).
    ``target`` defaults to ``search.<kind>.target_bitwidth`` (``auto``: the top of the range, see
    :func:`~mpq.runner.config.target_bits`)."""
    kc = s[kind]
    if target is None:
        top = target_bits(s, kind, problem.avg_range()[1] if problem is not None else most_bits(kc))
    else:
        top = target
    ks = sweep_values(kc.k_min, kc.k_max, kc.k_num)
    if s.sweep != "full" or problem is None:
        return sweep_values(top - s.sweep_span, top, s.sweep_steps), ks
    if (
        s.mode == "mpq"
    ):  # K free (no ratio constraint) reaches the ends of the range: every layer at its fewest/most bits
        ks = [*ks, math.inf]
    lo, hi = (below or problem).avg_range()[0], problem.avg_range()[1]
    n = max(2, math.ceil(round((hi - lo) / s.sweep_density, 6)) + 1)
    named = [budget_avg_bits(problem, b) for b in [top, *kc.budgets]]
    return sorted(set(sweep_values(lo, hi, n)) | {round(t, 4) for t in named if lo <= t <= hi}), ks


def most_bits(kc: Any) -> float:
    """The most integer bits a kind's groups may take (the top of a range with no problem to measure it)."""
    ints = [float(b) for b in [*kc.bits_content, *kc.bits_quality] if not isinstance(b, str)]
    return max(ints, default=8.0)


def budget_avg_bits(problem: Problem, budget: Any) -> float:
    """A named budget as average bits: a number is average bits already; a string with a unit (``750KB``,
    ``1.5MiB``, ``2GB``, ``700000B``) is bytes, converted by the same formula as :func:`budget_for_avg`."""
    if not isinstance(budget, str):
        return float(budget)
    return avg_for_bytes(problem, parse_bytes(budget))


def avg_for_bytes(problem: Problem, nbytes: float) -> float:
    """The average bits whose :func:`budget_for_avg` is ``nbytes`` (the formula is linear in the bits)."""
    base, per_bit = budget_for_avg(problem, 0.0), budget_for_avg(problem, 1.0) - budget_for_avg(problem, 0.0)
    return (nbytes - base) / per_bit if per_bit > 0 else math.nan


def solve_point(
    problem: Problem, mode: str, target: float, k: float, s: Any, budget_bytes: float | None = None
) -> Solution:
    if mode == "reference":
        return solve_reference(problem, target, k, s.band, s.solver, s.time_limit_s)
    budget = budget_bytes if budget_bytes is not None else budget_for_avg(problem, target)
    return solve_mpq(problem, budget, k, s.solver, s.time_limit_s, s.band)


def plan_key(plan: Mapping[str, int]) -> str:
    return hashlib.sha256(repr(sorted(plan.items())).encode()).hexdigest()[:16]


def run_sweep(
    problem: Problem,
    kind: str,
    mode: str,
    targets: Sequence[float],
    ks: Sequence[float],
    s: Any,
    show: bool = True,
    below: Problem | None = None,
) -> tuple[list[Candidate], dict[str, dict[str, int]]]:
    """Solve every (target, K): (one row per point, {file name: plan} with each distinct plan once, named
    ``<kind>_<target>_<K>.yaml`` after the first point that found it); a target under ``problem``'s fewest bits is
    solved in ``below`` (every bit allowed), when given. Nothing is written here."""
    floor = problem.avg_range()[0] - 1e-9
    rows: list[Candidate] = []
    written: dict[str, str] = {}
    plans: dict[str, dict[str, int]] = {}
    points = [(t, k) for t in targets for k in ks]
    base = problem
    for t, k in progress(points, desc=f"search: {kind} plans", unit="plan", disable=not show, leave=False):
        problem = below if below is not None and t < floor else base
        budget = budget_for_avg(problem, t) if mode == "mpq" else float("nan")
        if mode == "mpq" and budget < problem.bytes_range()[0]:
            sol = Solution({}, "INFEASIBLE", float("nan"), float("nan"), float("nan"), 0.0)
        else:
            sol = solve_point(problem, mode, t, k, s, budget if mode == "mpq" else None)
        row = Candidate(
            kind,
            mode,
            t,
            k,
            budget,
            sol.status,
            sol.gap,
            seconds=sol.seconds,
            **{key: float(v) for key, v in sol.details.items() if key in Candidate.__dataclass_fields__},
        )
        if sol.plan:
            key = plan_key(sol.plan)
            if key not in written:
                written[key] = plan_file_name(f"{kind}_{t:.2f}_{k:.2f}", sol.plan)  # .formats.yaml with formats
                plans[written[key]] = sol.plan
            row.plan_file = written[key]
        rows.append(row)
    if mode == "mpq":  # reference mode keeps MixDQ's family as it was
        simple = uniform_rows(base, kind, mode) if s.uniform else []
        simple += edge_rows(base, kind, mode) if s.edge_rules and kind == "weight" else []
        for row, plan, stem in simple:
            key = plan_key(plan)
            if key not in written:
                written[key] = plan_file_name(f"{kind}_{stem}", plan)
                plans[written[key]] = plan
            row.plan_file = written[key]
            rows.append(row)
    mark_pareto(rows)
    return rows, plans


def _label(key: Any) -> str:
    return str(key).replace("/", "-")


def _row(problem: Problem, kind: str, mode: str, plan: Mapping[str, Any], status: str) -> Candidate:
    from mpq.search.program import describe

    details = describe(problem, plan)
    content, quality = details.get("content_avg_bits"), details.get("quality_avg_bits")
    return Candidate(
        kind,
        mode,
        round(details["avg_bits"], 4),
        content / quality if content and quality else math.inf,  # the K it has
        details["bytes"],
        status,
        0.0,
        **{key: float(v) for key, v in details.items() if key in Candidate.__dataclass_fields__},
    )


def _common(problem: Problem) -> tuple[list[int], list[Any]]:
    """The layers the program chooses for, and the candidates every one of them may take."""
    layers = [i for i in range(len(problem.names)) if problem.bits[i]]
    common = [b for b in problem.bits[layers[0]] if all(b in problem.bits[i] for i in layers)] if layers else []
    return layers, common


def uniform_rows(problem: Problem, kind: str, mode: str) -> list[tuple[Candidate, dict[str, Any], str]]:
    """Every uniform plan of the family: each candidate every layer the program chooses for may take, on all of
    them (the plan a user picks by hand; the program's summed scores can miss it, and selection then compares it
    by images like any other)."""
    layers, common = _common(problem)
    out = []
    for b in common:
        plan = {problem.names[i]: b for i in layers}
        out.append((_row(problem, kind, mode, plan, UNIFORM), plan, f"uniform_{_label(b)}"))
    return out


def edge_rows(problem: Problem, kind: str, mode: str) -> list[tuple[Candidate, dict[str, Any], str]]:
    """The hand rule of GGUF users, for every candidate: a base candidate everywhere, and the layers outside the
    denoiser's numbered blocks (input/output layers, embeddings) and those of its first and last block one or two
    candidates higher (candidates ordered by the bytes of their uniform plans)."""
    from mpq.layers import edge_layers

    layers, common = _common(problem)
    ladder = sorted(common, key=lambda b: problem.plan_bytes({problem.names[i]: b for i in layers}))
    edges = edge_layers([problem.names[i] for i in layers])
    out = []
    for j, base in enumerate(ladder):
        for up in (1, 2):
            if j + up < len(ladder):
                high = ladder[j + up]
                plan = {problem.names[i]: high if problem.names[i] in edges else base for i in layers}
                row = _row(problem, kind, mode, plan, RULE)
                out.append((row, plan, f"edges_{_label(base)}_{_label(high)}"))
    return out


def write_sweep(folder: Path, plans: Mapping[str, Mapping[str, int]], prune: bool = False) -> None:
    """Write ``plans`` into ``folder`` (MixDQ plan files); ``prune``: the run's own candidate folder, whose earlier plan
    files not among ``plans`` are removed."""
    for old in folder.glob("*.yaml") if prune else []:
        if old.name not in plans:
            old.unlink()
    for name, plan in plans.items():
        write_plan(folder / name, plan)


def infeasible_sweep(problem: Problem, kind: str, mode: str, targets: Sequence[float], ks: Sequence[float]) -> MpqError:
    """The one-line error for a sweep without a single feasible point, with the range that is feasible."""
    lo, hi = problem.bytes_range()
    a_lo, a_hi = problem.avg_range()
    key = f"search.{kind}.target_bitwidth"
    return MpqError(
        f"no {kind} plan at any point of the sweep ({mode} mode, targets {min(targets):g}..{max(targets):g} avg bits, "
        f"K {min(ks):g}..{max(ks):g}); feasible: {a_lo:.2f}..{a_hi:.2f} avg bits ({lo:,.0f}..{hi:,.0f} bytes); "
        f"set {key} in that range (the earlier candidates are kept)"
    )


def mark_pareto(rows: list[Candidate]) -> None:
    """A row is on the front if no other feasible row of its kind has <= bytes and >= both group objectives (one
    strictly)."""
    ok = [r for r in rows if r.feasible]
    for r in rows:
        r.pareto = False

    def vec(r: Candidate) -> tuple[float, float, float]:
        return (r.bytes, -np.nan_to_num(r.content_norm_objective), -np.nan_to_num(r.quality_norm_objective))

    for r in ok:
        vr = vec(r)
        r.pareto = not any(
            o is not r
            and o.kind == r.kind
            and all(a <= b + 1e-12 for a, b in zip(vec(o), vr))
            and any(a < b - 1e-12 for a, b in zip(vec(o), vr))
            for o in ok
        )


def narrowed(cfg: Any, kind: str, subset: list[Any]) -> Any | None:
    """``cfg`` with the kind's groups narrowed to the candidates of ``subset`` (a ``search.<kind>.also`` entry) that
    are calibrated; None when none is."""
    from omegaconf import OmegaConf

    from mpq.search.build import candidates_of

    known = [b for b in subset if b in candidates_of(cfg, kind)]
    if not known:
        return None
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    kc = out.search[kind]
    kc.bits_content = [b for b in kc.bits_content if b in known] or known
    kc.bits_quality = [b for b in kc.bits_quality if b in known] or known
    kc.also = []
    return out


def join_family(
    family: dict[str, dict[str, Any]],
    rows: list[Candidate],
    plans: dict[str, dict[str, Any]],
    kind: str,
    subset: list[Any],
) -> list[Candidate]:
    """A narrower sweep's rows and plans joined to ``family`` (in place): a plan the family has keeps its file; a new
    one is named ``<kind>_<subset>_<rest>`` (``weight_w248_4.00_inf.yaml``)."""
    have = {plan_key(p): f for f, p in family.items()}
    tag = f"{kind[0]}{''.join(_label(b) for b in subset)}"
    names: dict[str, str] = {}
    for f, plan in plans.items():
        key = plan_key(plan)
        if key not in have:
            have[key] = f"{kind}_{tag}_{f[len(kind) + 1 :]}"
            family[have[key]] = plan
        names[f] = have[key]
    for r in rows:
        r.plan_file = names.get(r.plan_file, r.plan_file)
    return rows


def run_search(cfg: Any, run: RunDir, kinds: Sequence[str] = KINDS, show: bool = True) -> list[Candidate]:
    """The search stage: candidates/{weight,act}/*.yaml, candidates/act_protect.pt, candidates/pareto.csv."""
    rows: list[Candidate] = []
    found: dict[str, dict[str, dict[str, int]]] = {}
    protected: list[str] = []
    for kind in kinds:  # every kind solved before anything is written: a failed search keeps the last good outputs
        problem, protect = run_problem(cfg, run, kind)
        protected = protect if kind == "act" else protected
        s = cfg.search
        below = (
            run_problem(cfg, run, kind, every_bit=True)[0] if s.sweep == "full" and s[kind].every_bit_below else None
        )
        targets, ks = sweep_grid(s, kind, problem=problem, below=below)
        kind_rows, found[kind] = run_sweep(problem, kind, s.mode, targets, ks, s, show, below)
        if not any(r.feasible and r.solved for r in kind_rows):  # the uniform and rule plans alone: not a sweep
            raise infeasible_sweep(problem, kind, cfg.search.mode, targets, ks)
        for subset in s[kind].also if s.mode == "mpq" else []:
            narrow = narrowed(cfg, kind, list(subset))
            groups = ("bits_content", "bits_quality")
            if narrow is None or all(list(narrow.search[kind][g]) == list(s[kind][g]) for g in groups):
                continue  # nothing of the set calibrated, or the groups' own sweep again
            sub = run_problem(narrow, run, kind)[0]
            sub_targets, _ = sweep_grid(s, kind, problem=sub)
            more, plans = run_sweep(sub, kind, s.mode, sub_targets, ks, s, show)
            kind_rows += join_family(found[kind], more, plans, kind, list(subset))
        mark_pareto(kind_rows)
        rows += kind_rows
    if "act" in kinds:
        write_protect_list(run.act_protect, protected)
    for kind, plans in found.items():
        write_sweep(run.candidate_folder(kind), plans, prune=True)
    write_candidates(run.candidate_table, rows)
    return rows
