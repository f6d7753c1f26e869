"""``mpq search`` beyond the run's sweep: a single (budget, K) point, ``--compare``, or MixDQ's own files.

The run's sweep itself is the ``search`` stage (:mod:`mpq.search.sweep`); this module serves the MixDQ-compatible
``scripts/integer_program.py`` flags (``--sensitivity_* --para_size_config``) and one-off solves, writing
plan files where asked. The CLI only parses the flags into a :class:`SolveRequest`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.plan import read_plan, write_plan
from mpq.runner.choices import KINDS
from mpq.runner.config import target_bits
from mpq.runner.rundir import RunDir
from mpq.search.build import compare_report, feasible_error, reference_problem, run_problem
from mpq.search.candidates import Candidate, write_candidates
from mpq.search.program import Problem, solve_compare
from mpq.search.sweep import infeasible_sweep, run_sweep, solve_point, sweep_grid, write_sweep


@dataclass
class MixdqFiles:
    """MixDQ's inputs: SSIM and SQNR sensitivity yaml, the layer-size file, optionally its act-protect list."""

    ssim: str
    sqnr: str
    sizes: str
    act_protect: str | None = None


@dataclass
class SolveRequest:
    kind: str | None = None  # weight | act; None: both (weight only with MixDQ files)
    mixdq: MixdqFiles | None = None
    target: float | None = None  # average bits; None: search.<kind>.target_bitwidth
    k: float | None = None  # one K (a single solve) instead of the sweep
    budget_mb: float | None = None  # mpq mode: one byte budget (a single solve)
    compare: str | None = None  # a plan file: solve within its per-group average bits
    out: str | None = None  # --compare: where the optimal plan goes
    outdir: Path | None = None  # plan files (MixDQ's --mixed_precision_config)

    @property
    def single(self) -> bool:
        return self.k is not None or self.budget_mb is not None


def solve(cfg: DictConfig, run: RunDir | None, req: SolveRequest, log: Callable[[str], None] = print) -> None:
    s = cfg.search

    def problem_for(k: str) -> Problem:
        if req.mixdq:
            m = req.mixdq
            return reference_problem(k, m.ssim, m.sqnr, m.sizes, cfg, m.act_protect, req.outdir)
        assert run is not None
        return run_problem(cfg, run, k)[0]

    if req.compare:
        if not req.out:
            raise MpqError("--compare PLAN needs --out BEST.yaml for the optimal plan")
        problem = problem_for(req.kind or "weight")
        given = read_plan(req.compare)
        best = solve_compare(problem, given, s.solver, s.time_limit_s)
        if not best.plan:
            raise MpqError(f"the solver found no plan ({best.status}) within the given plan's average bits")
        written = write_plan(req.out, best.plan)
        log(compare_report(problem, given, best))
        log(f"optimal plan: {written}")
        return
    kinds = [req.kind] if req.kind else (["weight"] if req.mixdq else list(KINDS))
    for k in kinds:
        problem = problem_for(k)
        target = req.target if req.target is not None else target_bits(s, k, problem.avg_range()[1])
        # in a run, single solves go beside the sweep folders: candidates/<kind>/ holds exactly the sweep's plans
        outdir = req.outdir or ((run.manual_plans if req.single else run.candidate_folder(k)) if run else None)
        if outdir is None:
            raise MpqError("give --mixed_precision_config DIR for the plan files")
        if not req.single:
            # MixDQ's files in, MixDQ's sweep out (target - sweep_span .. target); a run sweeps as search.sweep says
            targets, ks = sweep_grid(s, k, target, None if req.mixdq else problem)
            rows, plans = run_sweep(problem, k, s.mode, targets, ks, s)
            if not plans:
                raise infeasible_sweep(problem, k, s.mode, targets, ks)
            write_sweep(outdir, plans)
            write_candidates(outdir / "pareto.csv", rows)
            log(sweep_summary(rows, outdir))
            continue
        kk = req.k if req.k is not None else 1.0
        budget = req.budget_mb * 2**20 if req.budget_mb is not None else None
        try:
            sol = solve_point(problem, s.mode, target, kk, s, budget)
        except MpqError:
            raise feasible_error(problem, s.mode, target, kk, s.band, budget) from None
        if not sol.plan:
            raise feasible_error(problem, s.mode, target, kk, s.band, budget)
        path = outdir / f"{k}_{sol.details['avg_bits']:.2f}_{kk:.2f}.yaml"
        written = write_plan(path, sol.plan)
        d = sol.details
        log(
            f"{k} plan: {written}\n  avg bits {d['avg_bits']:.3f} "
            f"(content {d.get('content_avg_bits', float('nan')):.3f}, "
            f"quality {d.get('quality_avg_bits', float('nan')):.3f}), {d['bytes']:,.0f} bytes; solver {sol.status}, "
            f"gap {sol.gap:.1e}, {sol.seconds:.2f} s"
        )


def sweep_summary(rows: list[Candidate], outdir: Path) -> str:
    """Per kind: points, distinct plans, solver status, the largest gap, Pareto-optimal count."""
    lines: list[str] = []
    for kind in KINDS:
        rs = [r for r in rows if r.kind == kind]
        if not rs:
            continue
        status = Counter(r.status for r in rs)
        files = {r.plan_file for r in rs if r.feasible}
        worst_gap = max((r.gap for r in rs if r.feasible), default=0.0)
        lines.append(
            f"{kind}: {len(rs)} (budget, K) points, {len(files)} distinct plans in {outdir}; "
            f"status {dict(status)}; largest gap {worst_gap:.1e}; Pareto-optimal: {sum(r.pareto for r in rs)}"
        )
        if status.get("FEASIBLE"):
            lines.append(
                f"  warning: {status['FEASIBLE']} solves hit search.time_limit_s and are not proven optimal (see the "
                "gap column)"
            )
    return "\n".join(lines)
