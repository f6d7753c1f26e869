"""The candidate table (``candidates/pareto.csv``): one typed row per (kind, budget, K) point of the sweep.

Read and written here only, so that numbers stay numbers and booleans booleans
everywhere else. The plan itself lives in ``candidates/<kind>/<plan_file>``
(MixDQ's plan yaml); :func:`candidate_plans` reads the plans back as
:class:`~mpq.plan.BitPlan` s, act plans with the run's act-protect list.
Average bits follow :mod:`mpq.cost`: over the layers the plan quantizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mpq.plan import BitPlan, read_layer_list, read_plan
from mpq.runner.files import read_records, write_records
from mpq.runner.rundir import RunDir

UNIFORM = "UNIFORM"  # a uniform plan of the family (search.uniform)
RULE = "RULE"  # a hand rule's plan: edges one or two candidates up (search.edge_rules)


@dataclass
class Candidate:
    kind: str  # weight | act
    mode: str  # mpq | reference
    target_avg_bits: float
    K: float
    budget_bytes: float  # mpq mode's byte budget (nan in reference mode)
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | ... (solved) | UNIFORM | RULE (simple plans, not solved)
    gap: float
    content_objective: float = math.nan
    quality_objective: float = math.nan
    content_norm_objective: float = math.nan
    quality_norm_objective: float = math.nan
    avg_bits: float = math.nan  # size-weighted over the layers the plan quantizes (its FP layers are in ``bytes``)
    content_avg_bits: float = math.nan
    quality_avg_bits: float = math.nan
    bytes: float = math.nan  # weight bytes (weight kind) or one sample's summed activation bytes (act kind)
    pareto: bool = False
    plan_file: str = ""  # empty: no plan (infeasible point); identical plans share one file
    seconds: float = field(default=0.0, repr=False, compare=False, metadata={"csv": False})  # in memory only

    @property
    def solved(self) -> bool:
        """A point of the sweep (not one of the simple plans the family also holds)."""
        return self.status not in (UNIFORM, RULE)

    @property
    def feasible(self) -> bool:
        return bool(self.plan_file)

    @property
    def objective(self) -> float:
        """The combined normalized objective (content + quality) of the plan."""
        return sum(v for v in (self.content_norm_objective, self.quality_norm_objective) if not math.isnan(v))


FIX = "delete it and re-run `mpq search`"


def write_candidates(path: str | Path, rows: list[Candidate]) -> None:
    write_records(path, rows, Candidate)


def read_candidates(path: str | Path) -> list[Candidate]:
    """Every row of a candidate table, typed; a missing column or bad value is a one-line error."""
    return read_records(path, Candidate, FIX)


def candidate_plans(run: RunDir, rows: list[Candidate], kind: str, pareto_only: bool = False) -> dict[str, BitPlan]:
    """{plan file: BitPlan} of the distinct feasible plans of ``kind`` (act plans carry the run's act-protect list)."""
    files = sorted({r.plan_file for r in rows if r.kind == kind and r.feasible and (r.pareto or not pareto_only)})
    protected = read_layer_list(run.act_protect) if kind == "act" and run.act_protect.is_file() else []
    plans = {}
    for f in files:
        mapping = read_plan(run.candidate_plan(kind, f))
        plans[f] = BitPlan(mapping) if kind == "weight" else BitPlan({}, mapping, frozenset(protected))
    return plans
