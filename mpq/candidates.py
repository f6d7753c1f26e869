"""The candidate table (``candidates/pareto.csv``): one typed row per (kind, budget, K) point of the sweep.

Read and written here only, so that numbers stay numbers and booleans booleans
everywhere else. The plan itself lives in ``candidates/<kind>/<plan_file>``
(MixDQ's plan yaml); :meth:`Candidate.load_plan` reads it back as a
:class:`~mpq.plan.BitPlan` with the run's act-protect list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.files import read_csv, write_csv
from mpq.plan import BitPlan, read_layer_list, read_plan


@dataclass
class Candidate:
    kind: str  # weight | act
    mode: str  # mpq | reference
    target_avg_bits: float
    K: float
    budget_bytes: float  # mpq mode's byte budget (nan in reference mode)
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | ...
    gap: float
    content_objective: float = math.nan
    quality_objective: float = math.nan
    content_norm_objective: float = math.nan
    quality_norm_objective: float = math.nan
    avg_bits: float = math.nan  # size-weighted over all layers, FP layers at the model dtype's bits
    content_avg_bits: float = math.nan
    quality_avg_bits: float = math.nan
    bytes: float = math.nan  # weight bytes (weight kind) or one sample's summed activation bytes (act kind)
    pareto: bool = False
    plan_file: str = ""  # empty: no plan (infeasible point); identical plans share one file
    plan: BitPlan | None = field(default=None, repr=False, compare=False)  # in memory only
    seconds: float = field(default=0.0, repr=False, compare=False)  # in memory only

    @property
    def feasible(self) -> bool:
        return bool(self.plan_file)

    @property
    def objective(self) -> float:
        """The combined normalized objective (content + quality) of the plan."""
        return sum(v for v in (self.content_norm_objective, self.quality_norm_objective) if not math.isnan(v))


COLUMNS = tuple(f.name for f in fields(Candidate) if f.name not in ("plan", "seconds"))


def write_candidates(path: str | Path, rows: list[Candidate]) -> None:
    write_csv(path, [{c: getattr(r, c) for c in COLUMNS} for r in rows], COLUMNS)


def _parse(name: str, kind: type | str, value: str, where: str) -> Any:
    if kind in (float, "float"):
        try:
            return float(value) if value not in ("", None) else math.nan
        except ValueError:
            raise MpqError(f"{where}: column {name} has {value!r}, not a number; delete it and re-run `mpq search`") from None
    if kind in (bool, "bool"):
        if value not in ("True", "False"):
            raise MpqError(f"{where}: column {name} has {value!r}, not True/False; delete it and re-run `mpq search`")
        return value == "True"
    return value


def read_candidates(path: str | Path) -> list[Candidate]:
    """Every row of a candidate table, typed; a missing column or bad value is a one-line error."""
    rows = read_csv(path)
    if not rows:
        raise MpqError(f"{path}: no candidates; delete it and re-run `mpq search`")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise MpqError(f"{path}: column {missing[0]} is missing (written by another mpq version?); delete it and re-run `mpq search`")
    types = {f.name: f.type for f in fields(Candidate)}
    out = []
    for n, r in enumerate(rows, start=2):
        out.append(Candidate(**{c: _parse(c, types[c], r[c], f"{path} line {n}") for c in COLUMNS}))
    return out


def candidate_plans(folder: str | Path, rows: list[Candidate], kind: str, pareto_only: bool = False) -> dict[str, BitPlan]:
    """{plan file: BitPlan} of the distinct feasible plans of ``kind`` (act plans carry the run's act-protect list)."""
    folder = Path(folder)
    files = sorted({r.plan_file for r in rows if r.kind == kind and r.feasible and (r.pareto or not pareto_only)})
    protect_file = folder / "act_protect.pt"
    protected = read_layer_list(protect_file) if kind == "act" and protect_file.is_file() else []
    plans = {}
    for f in files:
        mapping = read_plan(folder / kind / f)
        plans[f] = BitPlan(mapping) if kind == "weight" else BitPlan({}, mapping, frozenset(protected))
    return plans
