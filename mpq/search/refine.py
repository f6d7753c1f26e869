"""A composition-aware step after the program: local search from a plan, scored by the whole plan's error.

The program maximizes a *sum* of per-layer scores, each measured with one layer quantized alone; where layers
interact, the sum misleads it between near neighbours. :func:`refine` starts from a plan (selection's best within a
budget) and tries one-step moves on the candidate ladder of each layer (a tied group moves as one): raise a layer
where the budget has room, or raise one and lower another. Moves are tried in the order the program's own scores
rank them (the near ties first), a round of ``per_round`` at a time, each scored by ``objective`` (the whole plan:
selection's image MSE against FP); the best move of a round is taken when it lowers the objective, and the search
stops when ``evals`` objective calls are spent or no untried move is left. Pure: the caller supplies the objective.

It never returns a plan worse on its objective than the start (the start is the first point of the trail), nor
one over ``limit`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mpq.search.program import Problem

Plan = dict[str, Any]


@dataclass
class Move:
    label: str  # "raise a 4->5", "raise a 4->5, lower b 4->3"
    changes: Plan  # the layers it changes, with their new choices
    predicted: float  # change of the program's objective (normalized group scores; higher is better)
    bytes: float
    base: Mapping[str, Any]  # the plan it moves from (shared by every move of a round, never copied)

    @property
    def plan(self) -> Plan:
        """The whole plan after the move (made when asked: a round has thousands of moves, few are scored)."""
        return {**self.base, **self.changes}


@dataclass
class Refined:
    plan: Plan
    value: float
    start_value: float
    evals: int
    trail: list[tuple[str, float, float]] = field(default_factory=list)  # (move, objective, bytes) of each accepted

    @property
    def improved(self) -> bool:
        return self.value < self.start_value


def _units(problem: Problem) -> list[list[int]]:
    """The units of choice: each tied group once, every other layer the program chooses for alone."""
    tied = problem.tied_indices()
    in_tie = {i for tie in tied for i in tie}
    singles = [[i] for i in range(len(problem.names)) if problem.bits[i] and i not in in_tie]
    return [*tied, *singles]


def _ladder(problem: Problem, i: int) -> list[int]:
    """Layer ``i``'s candidate indices ordered by bytes (ties by score, then list order)."""
    return sorted(range(len(problem.bits[i])), key=lambda j: (problem.bytes[i][j], problem.scores[i][j], j))


def _weights(problem: Problem) -> list[float]:
    """Each layer's weight in the program's objective: its group's scores normalized to [0, 1]."""
    out = [0.0] * len(problem.names)
    for g in {problem.groups[i] for i in range(len(problem.names)) if problem.bits[i]}:
        lo, hi = problem._norm_span(g)
        for i in problem.members(g):
            out[i] = 1.0 / (hi - lo) if hi > lo else 0.0
    return out


def neighbours(problem: Problem, plan: Mapping[str, Any], limit: float) -> list[Move]:
    """Every one-step move of ``plan`` within ``limit`` bytes, best predicted first: a unit one step up its ladder
    (where the budget has room), or one unit up and another one step down."""
    w = _weights(problem)
    base = problem.plan_bytes(plan)
    steps: list[tuple[list[int], int, int, float, float]] = []  # (unit, from, to, d_bytes, d_score) per direction
    for unit in _units(problem):
        i = unit[0]
        ladder = _ladder(problem, i)
        at = ladder.index(problem.bits[i].index(plan[problem.names[i]]))
        for to in (at - 1, at + 1):
            if 0 <= to < len(ladder):
                a, b = ladder[at], ladder[to]
                d_bytes = sum(problem.bytes[k][b] - problem.bytes[k][a] for k in unit)
                d_score = sum(w[k] * (problem.scores[k][b] - problem.scores[k][a]) for k in unit)
                steps.append((unit, a, b, d_bytes, d_score))
    ups = [s for s in steps if s[3] > 0]
    downs = [s for s in steps if s[3] < 0]

    def make(parts: list[tuple[list[int], int, int, float, float]]) -> Move:
        changes = {}
        labels = []
        for unit, a, b, _, _ in parts:
            for k in unit:
                changes[problem.names[k]] = problem.bits[k][b]
            i = unit[0]
            verb = "raise" if problem.bytes[i][b] > problem.bytes[i][a] else "lower"
            labels.append(f"{verb} {problem.names[i]} {problem.bits[i][a]}->{problem.bits[i][b]}")
        return Move(", ".join(labels), changes, sum(p[4] for p in parts), base + sum(p[3] for p in parts), plan)

    moves = [make([u]) for u in ups if base + u[3] <= limit * (1 + 1e-9)]
    moves += [make([u, d]) for u in ups for d in downs if d[0] is not u[0] and base + u[3] + d[3] <= limit * (1 + 1e-9)]
    return sorted(moves, key=lambda m: (-m.predicted, m.bytes, m.label))


def refine(
    problem: Problem,
    start: Mapping[str, Any],
    limit: float,
    objective: Callable[[Plan], float],
    evals: int = 40,
    per_round: int = 8,
    start_value: float | None = None,
    many: Callable[[list[Plan]], list[float]] | None = None,
) -> Refined:
    """Local search from ``start`` within ``limit`` bytes, ``evals`` objective calls at most (the start's own
    counts unless ``start_value`` is given); lower ``objective`` is better. ``many``: the objective of a round's
    plans at once (in order; e.g. shared out over processes), instead of ``objective`` one by one. See the module
    docstring."""
    current = dict(start)
    value = objective(current) if start_value is None else start_value
    spent = 0 if start_value is not None else 1
    first = value
    trail = [("start", value, problem.plan_bytes(current))]

    moved: dict[str, Any] = {}  # the current plan's layers that differ from the start

    def key(m: Move) -> frozenset[tuple[str, Any]]:
        """The plan after ``m`` by its difference from the start (a few layers: cheap for every move of a round;
        equal plans, equal keys)."""
        diff = dict(moved)
        for n, v in m.changes.items():
            if v == start[n]:
                diff.pop(n, None)
            else:
                diff[n] = v
        return frozenset(diff.items())

    seen: set[frozenset[tuple[str, Any]]] = {frozenset()}  # the start
    while spent < evals:
        untried = [m for m in neighbours(problem, current, limit) if key(m) not in seen]
        if not untried:
            break
        improved = False
        for lo in range(0, len(untried), per_round):
            batch = untried[lo : lo + per_round][: evals - spent]
            if not batch:
                break
            seen.update(key(m) for m in batch)
            values = many([m.plan for m in batch]) if many else [objective(m.plan) for m in batch]
            scored = list(zip(values, batch))
            spent += len(batch)
            v, best = min(scored, key=lambda t: (t[0], t[1].bytes, t[1].label))
            if v < value:
                moved = dict(key(best))
                current, value = best.plan, v
                trail.append((best.label, v, best.bytes))
                improved = True
                break
            if spent >= evals:
                break
        if not improved:
            break
    return Refined(current, value, first, spent, trail)
