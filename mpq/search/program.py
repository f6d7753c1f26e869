"""The integer program (OR-Tools): bit allocation as pure functions over a :class:`Problem`.

A :class:`Problem` holds, per layer, its group, its size, the allowed bits
and the sensitivity score of each allowed bit. Three programs:

* :func:`solve_reference` (MixDQ): one program per group; the overall average
  bits target T is split by K = avg_content / avg_quality, weighted by group
  sizes (T * S = K * a_q * S_c + a_q * S_q); each group's size-weighted
  average bits must stay within +-band of its share; each maximizes its summed
  metric (SSIM for content, SQNR for quality).
* :func:`solve_mpq`: one program over all layers with a budget in **bytes**
  (packed weights plus scales); K means what it means in MixDQ (content
  average bits = K x quality average bits, +-band); maximizes the sum of the
  two groups' objectives, each normalized to [0, 1] (0: every layer at its
  worst allowed bit, 1: at its best).
* :func:`solve_compare`: a group-wise program with a given plan's per-group
  average bits as upper bounds: the best plan no larger than it.

Every solve runs to a relative MIP gap of 1e-6 (:data:`MIP_GAP`); its status,
objective, best bound and gap are returned; a non-optimal result is flagged,
never silent. Average bits are :func:`mpq.cost.average_bits`'s: over the
layers the program chooses for (its FP layers count in bytes only), for the
K constraint and for every reported number alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpq.cost import average_bits
from mpq.errors import MpqError
from mpq.layers import CONTENT, GROUPS, QUALITY
from mpq.quant.formats import Key, nominal_bits

DEFAULT_SOLVER = "CBC"


@dataclass
class Problem:
    names: list[str]
    groups: list[str]  # content | quality per layer
    sizes: np.ndarray  # elements per layer (weights or input activations): the average-bits weights
    bits: list[list[Key]]  # allowed bits (or weight formats) per layer (empty: the layer stays FP, not in the plan)
    scores: list[list[float]]  # sensitivity score per allowed bit (higher is better)
    bytes: list[list[float]]  # storage bytes per allowed bit
    fixed_bytes: float = 0.0  # bytes of layers that stay FP
    kind: str = "weight"  # weight | act (what its budgets in average bits count: see build.budget_for_avg)
    ties: list[tuple[str, ...]] = field(default_factory=list)  # layers that take one choice (one tensor in a file)
    fp_prices: list[float] = field(default_factory=list)  # bytes of each layer kept FP (a candidate may keep it so)

    def __post_init__(self) -> None:
        for i, name in enumerate(self.names):
            if len(self.bits[i]) != len(self.scores[i]) or len(self.bits[i]) != len(self.bytes[i]):
                raise ValueError(f"layer {name}: bits, scores and bytes differ in length")
            if self.bits[i] and not np.all(np.isfinite(self.scores[i])):
                raise MpqError(
                    f"layer {name}: sensitivity scores {self.scores[i]} are not finite; fix the sensitivity file"
                )
        index = {n: i for i, n in enumerate(self.names)}
        for tie in self.ties:
            unknown = [n for n in tie if n not in index]
            if unknown:
                raise MpqError(f"tied layer {unknown[0]} is not a layer of the problem")
            if len({tuple(self.bits[index[n]]) for n in tie}) > 1:
                raise MpqError(
                    f"layers {', '.join(tie)} are one tensor in the exported file and must take one choice, but "
                    "their groups allow different candidates (or some are protected); give them the same candidates"
                )

    def tied_indices(self) -> list[list[int]]:
        index = {n: i for i, n in enumerate(self.names)}
        return [[index[n] for n in tie] for tie in self.ties if self.bits[index[tie[0]]]]

    def members(self, group: str) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group and self.bits[i]]

    def group_size(self, group: str) -> float:
        return float(sum(self.sizes[i] for i in self.members(group)))

    # ---------------------------------------------------------------- plan accounting
    def avg_bits(self, plan: Mapping[str, int], group: str | None = None) -> float:
        """Size-weighted average bits of ``plan`` over the layers (of ``group``) the program chooses for: the one
        definition (:func:`mpq.cost.average_bits`); layers this problem keeps FP count in bytes only."""
        idx = [i for i in range(len(self.names)) if self.bits[i] and (group is None or self.groups[i] == group)]
        return average_bits((float(self.sizes[i]), plan.get(self.names[i])) for i in idx)

    def plan_bytes(self, plan: Mapping[str, int]) -> float:
        return self.fixed_bytes + sum(
            self.bytes[i][self.bits[i].index(plan[n])] for i, n in enumerate(self.names) if self.bits[i]
        )

    def raw_objective(self, plan: Mapping[str, int], group: str) -> float:
        return float(sum(self.scores[i][self.bits[i].index(plan[self.names[i]])] for i in self.members(group)))

    def norm_objective(self, plan: Mapping[str, int], group: str) -> float:
        lo, hi = self._norm_span(group)
        return (self.raw_objective(plan, group) - lo) / (hi - lo) if hi > lo else 1.0

    def _norm_span(self, group: str) -> tuple[float, float]:
        m = self.members(group)
        return float(sum(min(self.scores[i]) for i in m)), float(sum(max(self.scores[i]) for i in m))

    def bytes_range(self) -> tuple[float, float]:
        act = [i for i in range(len(self.names)) if self.bits[i]]
        return (
            self.fixed_bytes + sum(min(self.bytes[i]) for i in act),
            self.fixed_bytes + sum(max(self.bytes[i]) for i in act),
        )

    def avg_range(self, group: str | None = None) -> tuple[float, float]:
        idx = [i for i in range(len(self.names)) if self.bits[i] and (group is None or self.groups[i] == group)]
        total = sum(self.sizes[i] for i in idx)
        return (
            sum(self.sizes[i] * min(map(nominal_bits, self.bits[i])) for i in idx) / total,
            sum(self.sizes[i] * max(map(nominal_bits, self.bits[i])) for i in idx) / total,
        )


@dataclass
class Solution:
    plan: dict[str, int]
    status: str  # OPTIMAL | FEASIBLE (time limit: see gap) | INFEASIBLE
    objective: float
    bound: float
    gap: float
    seconds: float
    details: dict[str, float] = field(default_factory=dict)

    @property
    def optimal(self) -> bool:
        return self.status == "OPTIMAL"


def _status_name(code: int) -> str:
    from ortools.linear_solver import pywraplp

    names = {
        pywraplp.Solver.OPTIMAL: "OPTIMAL",
        pywraplp.Solver.FEASIBLE: "FEASIBLE",
        pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
        pywraplp.Solver.UNBOUNDED: "UNBOUNDED",
        pywraplp.Solver.ABNORMAL: "ABNORMAL",
        pywraplp.Solver.MODEL_INVALID: "MODEL_INVALID",
        pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
    }
    return names.get(code, "ABNORMAL")


# Relative MIP gap: the optimum up to 1e-6 of the objective, far below the noise of any sensitivity score.
# A zero gap made CBC spend 63 s (then stop unproven at 4e-7) on one near-tied point of the embedded model's
# sweep that it solves in 0.06 s at 1e-6; SCIP solved it in 0.09 s. The status and gap are always reported.
MIP_GAP = 1e-6


def _solve_mip(
    layers: Sequence[int],
    problem: Problem,
    weights: Mapping[int, float],
    score_of: Mapping[int, Sequence[float]],
    constraints: Sequence[tuple[Mapping[int, Sequence[float]], float, float]],
    solver_name: str,
    time_limit_s: float,
) -> tuple[dict[int, int], str, float, float, float]:
    """max sum_i w_i * score_i[x_i] s.t. lo <= sum_i coef_i[x_i] <= hi; x_i one allowed bit. Returns choices index."""
    import time

    from ortools.linear_solver import pywraplp

    t0 = time.perf_counter()
    solver = pywraplp.Solver.CreateSolver(solver_name)
    if solver is None:
        raise MpqError(f"OR-Tools has no solver '{solver_name}' here; use search.solver=CBC or SCIP")
    x = {i: [solver.BoolVar(f"x_{i}_{j}") for j in range(len(problem.bits[i]))] for i in layers}
    for i in layers:
        solver.Add(solver.Sum(x[i]) == 1)
    present = set(layers)
    for tie in problem.tied_indices():
        inside = [i for i in tie if i in present]
        if inside and len(inside) < len(tie):
            names = ", ".join(problem.names[i] for i in tie)
            raise MpqError(
                f"layers {names} are one tensor in the exported file but fall in different groups, which the "
                "reference program solves apart; use search.mode=mpq (one program over all layers)"
            )
        for i in inside[1:]:  # the same candidate as the first (same candidate lists: see Problem)
            for j in range(len(x[i])):
                solver.Add(x[i][j] == x[inside[0]][j])
    for coefs, lo, hi in constraints:
        c = solver.Constraint(lo, hi)
        for i in layers:
            for j, v in enumerate(coefs[i]):
                c.SetCoefficient(x[i][j], float(v))
    obj = solver.Objective()
    for i in layers:
        for j, s in enumerate(score_of[i]):
            obj.SetCoefficient(x[i][j], float(weights[i] * s))
    obj.SetMaximization()
    solver.SetTimeLimit(int(time_limit_s * 1000))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, MIP_GAP)
    status = _status_name(solver.Solve(params))
    seconds = time.perf_counter() - t0
    if status not in ("OPTIMAL", "FEASIBLE"):
        return {}, status, float("nan"), float("nan"), seconds
    choice = {i: max(range(len(x[i])), key=lambda j, i=i: x[i][j].solution_value()) for i in layers}
    value, bound = obj.Value(), obj.BestBound()
    if status == "OPTIMAL":
        bound = value
    return choice, status, value, bound, seconds


def _gap(value: float, bound: float) -> float:
    return abs(bound - value) / max(abs(bound), 1e-12)


def _solution(problem: Problem, parts: list[tuple[dict[int, int], str, float, float, float]]) -> Solution:
    plan: dict[str, int] = {}
    statuses, value, bound, seconds = [], 0.0, 0.0, 0.0
    for choice, status, v, b, s in parts:
        statuses.append(status)
        seconds += s
        if status in ("OPTIMAL", "FEASIBLE"):
            plan.update({problem.names[i]: problem.bits[i][j] for i, j in choice.items()})
            value, bound = value + v, bound + b
    worst = next((s for s in statuses if s not in ("OPTIMAL", "FEASIBLE")), None) or (
        "FEASIBLE" if "FEASIBLE" in statuses else "OPTIMAL"
    )
    if worst not in ("OPTIMAL", "FEASIBLE"):
        return Solution({}, worst, float("nan"), float("nan"), float("nan"), seconds)
    sol = Solution(plan, worst, value, bound, _gap(value, bound), seconds)
    sol.details = describe(problem, plan)
    return sol


def describe(problem: Problem, plan: Mapping[str, int]) -> dict[str, float]:
    """Per-group objective (raw and normalized) and average bits, overall avg bits and bytes."""
    d: dict[str, float] = {"avg_bits": problem.avg_bits(plan), "bytes": problem.plan_bytes(plan)}
    for g in GROUPS:
        if problem.members(g):
            d[f"{g}_objective"] = problem.raw_objective(plan, g)
            d[f"{g}_norm_objective"] = problem.norm_objective(plan, g)
            d[f"{g}_avg_bits"] = problem.avg_bits(plan, g)
    return d


# ------------------------------------------------------------------------------ reference (MixDQ)
def split_target(problem: Problem, target: float, k: float) -> dict[str, float]:
    """Per-group average-bit shares: a_c = K a_q and (a_c S_c + a_q S_q) = T (S_c + S_q)."""
    s_c, s_q = problem.group_size(CONTENT), problem.group_size(QUALITY)
    if s_c == 0 or s_q == 0:
        return {CONTENT: target, QUALITY: target}
    a_q = target * (s_c + s_q) / (k * s_c + s_q)
    return {CONTENT: k * a_q, QUALITY: a_q}


def _group_program(problem: Problem, group: str, lo_avg: float, hi_avg: float, solver: str, time_limit_s: float):
    m = problem.members(group)
    size = problem.group_size(group)
    coefs = {i: [problem.sizes[i] * nominal_bits(b) / size for b in problem.bits[i]] for i in m}
    return _solve_mip(
        m,
        problem,
        {i: 1.0 for i in m},
        {i: problem.scores[i] for i in m},
        [(coefs, lo_avg, hi_avg)],
        solver,
        time_limit_s,
    )


def solve_reference(
    problem: Problem,
    target: float,
    k: float,
    band: float = 0.02,
    solver: str = DEFAULT_SOLVER,
    time_limit_s: float = 60.0,
) -> Solution:
    shares = split_target(problem, target, k)
    parts = [
        _group_program(problem, g, shares[g] - band, shares[g] + band, solver, time_limit_s)
        for g in GROUPS
        if problem.members(g)
    ]
    sol = _solution(problem, parts)
    sol.details.update({f"{g}_share": shares[g] for g in GROUPS})
    return sol


def solve_compare(
    problem: Problem, plan: Mapping[str, int], solver: str = DEFAULT_SOLVER, time_limit_s: float = 60.0
) -> Solution:
    """The best plan whose per-group average bits do not exceed ``plan``'s."""
    missing = [problem.names[i] for i in range(len(problem.names)) if problem.bits[i] and problem.names[i] not in plan]
    if missing:
        raise MpqError(
            f"the plan has no bits for layer '{missing[0]}' ({len(missing)} layers missing); compare needs a complete "
            "plan"
        )
    for i, n in enumerate(problem.names):
        if problem.bits[i] and plan[n] not in problem.bits[i]:
            raise MpqError(f"the plan gives layer '{n}' {plan[n]} bits; allowed for its group: {problem.bits[i]}")
    parts = [
        _group_program(problem, g, 0.0, problem.avg_bits(plan, g) + 1e-9, solver, time_limit_s)
        for g in GROUPS
        if problem.members(g)
    ]
    return _solution(problem, parts)


# ------------------------------------------------------------------------------ mpq (bytes, joint)
def solve_mpq(
    problem: Problem,
    budget_bytes: float,
    k: float,
    solver: str = DEFAULT_SOLVER,
    time_limit_s: float = 60.0,
    band: float = 0.02,
) -> Solution:
    """One program over all layers: maximize the sum of the two groups' normalized objectives within a
    budget in bytes, with K as in MixDQ: the content group's average bits = K x the quality group's (+-``band``);
    ``k`` infinite: no ratio constraint (K free)."""
    lo, hi = problem.bytes_range()
    if budget_bytes < lo:
        raise MpqError(
            f"budget {budget_bytes:,.0f} bytes is below the smallest possible plan ({lo:,.0f} bytes); feasible range "
            f"{lo:,.0f} .. {hi:,.0f} bytes"
        )
    layers = [i for i in range(len(problem.names)) if problem.bits[i]]
    weights: dict[int, float] = {}
    for g in GROUPS:
        span_lo, span_hi = problem._norm_span(g)
        for i in problem.members(g):
            weights[i] = 1.0 / (span_hi - span_lo) if span_hi > span_lo else 0.0
    constraints = [({i: problem.bytes[i] for i in layers}, 0.0, budget_bytes - problem.fixed_bytes)]
    s_c, s_q = problem.group_size(CONTENT), problem.group_size(QUALITY)
    if s_c and s_q and math.isfinite(k):  # avg_content - K avg_quality in [-band, band]
        ratio = {
            i: [problem.sizes[i] * nominal_bits(b) / s_c for b in problem.bits[i]] for i in problem.members(CONTENT)
        }
        ratio.update(
            {
                i: [-k * problem.sizes[i] * nominal_bits(b) / s_q for b in problem.bits[i]]
                for i in problem.members(QUALITY)
            }
        )
        constraints.append((ratio, -band, band))
    part = _solve_mip(
        layers, problem, weights, {i: problem.scores[i] for i in layers}, constraints, solver, time_limit_s
    )
    return _solution(problem, [part])
