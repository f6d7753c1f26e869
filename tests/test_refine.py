"""The composition-aware local search after the program (mpq.search.refine), on problems with a known answer."""

import itertools

import numpy as np
import pytest

from mpq.search.program import Problem, solve_mpq
from mpq.search.refine import neighbours, refine

BITS = [2, 4, 8]


def problem_of(rng, n, ties=()):
    sizes = rng.integers(100, 1000, n).astype(float)
    bits = [list(BITS) for _ in range(n)]
    scores = [sorted(rng.uniform(0, 1, 3).tolist()) for _ in range(n)]
    nbytes = [[s * b / 8 + 2 for b in BITS] for s in sizes]
    groups = ["content" if i % 2 else "quality" for i in range(n)]
    return Problem([f"l{i}" for i in range(n)], groups, sizes, bits, scores, nbytes, 0.0, "weight", list(ties))


def interacting(problem, rng):
    """A whole-plan error the summed scores do not see: each layer's error plus a penalty on pairs of layers
    (adjacent ones) whose bits differ, as when one layer's error feeds the next."""
    err = {n: dict(zip(BITS, sorted(rng.uniform(0.1, 1.0, 3).tolist(), reverse=True))) for n in problem.names}
    calls = []

    def objective(plan):
        calls.append(dict(plan))
        v = sum(err[n][plan[n]] for n in problem.names)
        v += sum(0.4 * abs(np.log2(plan[a]) - np.log2(plan[b])) for a, b in zip(problem.names, problem.names[1:]))
        return float(v)

    return objective, calls


@pytest.mark.parametrize("seed", range(6))
def test_refine_never_worse_never_over_budget_and_ends_at_a_local_optimum(seed):
    rng = np.random.default_rng(seed)
    problem = problem_of(rng, 6)
    limit = problem.bytes_range()[0] + 0.45 * (problem.bytes_range()[1] - problem.bytes_range()[0])
    start = solve_mpq(problem, limit, float("inf"), "CBC", 10.0, 0.1).plan
    objective, calls = interacting(problem, rng)
    r = refine(problem, start, limit, objective, evals=10_000, per_round=4)
    assert r.start_value == objective(start)
    assert r.value <= r.start_value
    assert problem.plan_bytes(r.plan) <= limit * (1 + 1e-9)
    assert r.value == objective(r.plan)  # the value reported is the plan's own
    assert r.evals == len(calls) - 2  # every call counted (the two above are this test's)
    # a local optimum of its moves: no one-step move within the budget is better
    assert all(objective(m.plan) >= r.value for m in neighbours(problem, r.plan, limit))
    # and every accepted move strictly improved on the one before
    values = [v for _, v, _ in r.trail]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_refine_finds_what_the_summed_scores_miss():
    """Summed scores say: l0 and l2 high, l1 low; the whole plan pays for l1 being far from both. Brute force
    over every plan within the budget gives the answer; the local search reaches it from the program's plan."""
    sizes = np.array([100.0, 100.0, 100.0])
    scores = [[0.0, 0.5, 1.0], [0.0, 0.1, 0.2], [0.0, 0.5, 1.0]]
    nbytes = [[s * b / 8 for b in BITS] for s in sizes]
    problem = Problem(["l0", "l1", "l2"], ["quality"] * 3, sizes, [list(BITS)] * 3, scores, nbytes)
    limit = 100 * (8 + 2 + 8) / 8 + 1e-6  # room for 8/2/8, 4/4/8, 4/8/4, 2/8/8 ...
    start = solve_mpq(problem, limit, float("inf"), "CBC", 10.0, 0.1).plan
    assert start == {"l0": 8, "l1": 2, "l2": 8}

    own = {"l0": {2: 1.0, 4: 0.4, 8: 0.0}, "l1": {2: 1.0, 4: 0.4, 8: 0.0}, "l2": {2: 1.2, 4: 0.5, 8: 0.0}}

    def objective(plan):
        steps = abs(np.log2(plan["l0"]) - np.log2(plan["l1"])) + abs(np.log2(plan["l1"]) - np.log2(plan["l2"]))
        return float(sum(own[n][b] for n, b in plan.items()) + 0.15 * steps)

    best = min(
        (p for p in (dict(zip(["l0", "l1", "l2"], c)) for c in itertools.product(BITS, repeat=3))),
        key=lambda p: objective(p) if problem.plan_bytes(p) <= limit else np.inf,
    )
    r = refine(problem, start, limit, objective, evals=100)
    assert objective(start) > objective(best)
    assert best == {"l0": 4, "l1": 4, "l2": 8}
    assert r.plan == best and r.value == objective(best)


def test_tied_layers_move_as_one():
    rng = np.random.default_rng(3)
    problem = problem_of(rng, 5, ties=[("l1", "l3")])
    limit = problem.bytes_range()[1]
    start = {n: 2 for n in problem.names}
    for m in neighbours(problem, start, limit):
        assert m.plan["l1"] == m.plan["l3"], m.label
    r = refine(problem, start, limit, lambda p: -sum(p.values()) + 0.01 * p["l1"], evals=200)
    assert r.plan["l1"] == r.plan["l3"] == 8


def test_evals_cap_and_given_start_value():
    rng = np.random.default_rng(1)
    problem = problem_of(rng, 8)
    limit = problem.bytes_range()[1]
    calls = []

    def objective(plan):
        calls.append(1)
        return -float(sum(plan.values()))

    r = refine(problem, {n: 2 for n in problem.names}, limit, objective, evals=7, start_value=-16.0)
    assert len(calls) == r.evals == 7
    assert r.start_value == -16.0 and r.value < -16.0
