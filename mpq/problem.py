"""From layers and sensitivity files to the solver's :class:`~mpq.search.Problem`.

Content layers are scored by SSIM, quality layers by SQNR; each allowed bit
costs what :class:`~mpq.plan.CostModel` says; act-protected layers stay FP
(their bytes are fixed). Also here: MixDQ's act-protect rule, the budget of
an average bit-width, and the one-line error for an infeasible point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.groups import CONTENT, QUALITY
from mpq.mixdq_files import layers_from_ratio_file, read_sensitivity
from mpq.plan import CostModel, read_layer_list, write_layer_list
from mpq.quant.model import LayerInfo
from mpq.search import Problem, Solution, describe, split_target


def build_problem(kind: str, layers: Sequence[LayerInfo], ssim: Mapping[str, list[float]], sqnr: Mapping[str, list[float]],
                  cand_bits: Sequence[int], allowed: Mapping[str, Sequence[int]], protect: Sequence[str] = (),
                  cost: CostModel | None = None) -> Problem:
    """The ``kind`` (weight|act) problem: one entry per layer, protected layers FP with fixed bytes."""
    cost = cost or CostModel()
    price = cost.act_bytes if kind == "act" else cost.weight_bytes
    names, groups, sizes, bits, scores, nbytes = [], [], [], [], [], []
    fixed = 0.0
    protected = set(protect)
    for layer in layers:
        table = ssim if layer.group == CONTENT else sqnr
        metric = "ssim" if layer.group == CONTENT else "sqnr"
        if layer.name not in table:
            raise MpqError(f"the {kind} {metric} sensitivity file has no entry for {layer.group} layer '{layer.name}'; re-run the sensitivity stage")
        names.append(layer.name)
        groups.append(layer.group)
        sizes.append(layer.act_numel if kind == "act" else layer.weight_numel)
        if layer.name in protected:
            bits.append([]), scores.append([]), nbytes.append([])
            fixed += price(layer, None)
            continue
        ok = [b for b in cand_bits if b in allowed[layer.group]]
        bits.append(ok)
        scores.append([table[layer.name][list(cand_bits).index(b)] for b in ok])
        nbytes.append([price(layer, b) for b in ok])
    return Problem(names, groups, np.asarray(sizes, dtype=np.float64), bits, scores, nbytes, fixed, cost.fp_bits)


def act_protect_list(layers: Sequence[LayerInfo], ssim: Mapping[str, list[float]], sqnr: Mapping[str, list[float]],
                     cand_bits: Sequence[int], percent: float, rank_bit: int) -> list[str]:
    """MixDQ's rule: per group, the ceil(``percent`` %) layers whose activations are most damaged at
    ``rank_bit`` bits (lowest SSIM for content, lowest SQNR for quality) stay FP. On MixDQ's published
    SDXL-Turbo activation sensitivity, 1% at A8 gives exactly its shipped 9-layer list."""
    chosen: list[str] = []
    col = list(cand_bits).index(rank_bit)
    for group, table in ((CONTENT, ssim), (QUALITY, sqnr)):
        members = [layer.name for layer in layers if layer.group == group and layer.name in table]
        if not members or percent <= 0:
            continue
        n = math.ceil(len(members) * percent / 100.0 - 1e-9)
        chosen += sorted(members, key=lambda name: (table[name][col], name))[:n]
    return chosen


def write_protect_list(folder: Path, names: Sequence[str]) -> None:
    """``act_protect.pt`` (MixDQ: a torch.save'd list) and ``act_protect.txt`` (one name a line)."""
    from mpq.files import write_text

    write_layer_list(folder / "act_protect.pt", names)
    write_text(folder / "act_protect.txt", "".join(n + "\n" for n in names))


def allowed_bits(kc: Any) -> dict[str, list[int]]:
    return {CONTENT: list(kc.bits_content), QUALITY: list(kc.bits_quality)}


def sensitivities(folder: Path, kind: str, n_bits: int, hint: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(SSIM table, SQNR table) of ``kind`` from a run's sensitivity folder."""
    paths = [folder / f"{kind}_{m}.yaml" for m in ("ssim", "sqnr")]
    for p in paths:
        if not p.is_file():
            raise MpqError(f"{p} is missing; {hint}")
    return read_sensitivity(paths[0], n_bits), read_sensitivity(paths[1], n_bits)


def run_problem(cfg: Any, run: Any, kind: str) -> tuple[Problem, list[str]]:
    """The ``kind`` problem of a run directory, and its act-protect list (empty for weights)."""
    from mpq.layer_table import layer_table

    cand = list(cfg.quant.bits)
    ssim, sqnr = sensitivities(run.root / "sensitivity", kind, len(cand), f"run `mpq sensitivity --base_path {run.root}` first")
    layers = layer_table(cfg)
    s = cfg.search
    protect = act_protect_list(layers, ssim, sqnr, cand, s.act_protect_percent, s.act_protect_bit) if kind == "act" else []
    return build_problem(kind, layers, ssim, sqnr, cand, allowed_bits(s[kind]), protect, CostModel.from_config(cfg)), protect


def reference_problem(kind: str, ssim_path: str, sqnr_path: str, ratio_path: str, cfg: Any, protect_path: str | None = None,
                      protect_out: Path | None = None) -> Problem:
    """A problem from MixDQ files: sizes are the ratio file's (so bytes are in ratio units). For activations
    without ``protect_path``, the act-protect list is derived by MixDQ's rule and written to ``protect_out``."""
    cand = list(cfg.quant.bits)
    ssim, sqnr = read_sensitivity(ssim_path, len(cand)), read_sensitivity(sqnr_path, len(cand))
    layers = layers_from_ratio_file(ratio_path, ssim, sqnr)
    if protect_path:
        protect = read_layer_list(protect_path)
    elif kind == "act":
        protect = act_protect_list(layers, ssim, sqnr, cand, cfg.search.act_protect_percent, cfg.search.act_protect_bit)
        if protect_out is not None:
            write_protect_list(protect_out, protect)
    else:
        protect = []
    return build_problem(kind, layers, ssim, sqnr, cand, allowed_bits(cfg.search[kind]), protect, CostModel(0, 2))


def budget_for_avg(problem: Problem, avg_bits: float) -> float:
    """Bytes of a plan whose every quantized layer has ``avg_bits`` (fractional) bits, scales included."""
    total = problem.fixed_bytes
    for i in range(len(problem.names)):
        if problem.bits[i]:
            overhead = problem.bytes[i][0] - problem.sizes[i] * problem.bits[i][0] / 8.0
            total += problem.sizes[i] * avg_bits / 8.0 + max(overhead, 0.0)
    return total


def feasible_error(problem: Problem, mode: str, target: float, k: float, band: float, budget: float | None = None) -> MpqError:
    """The one-line error for an impossible point, giving the feasible range (``budget``: bytes, mpq mode)."""
    if mode == "mpq":
        lo, hi = problem.bytes_range()
        budget = budget_for_avg(problem, target) if budget is None else budget
        if budget >= lo:
            return MpqError(f"no plan fits {budget:,.0f} bytes with K={k} (content avg bits = K x quality avg bits +-{band}); "
                            f"try another K or a larger search.band; budgets feasible with some K: {lo:,.0f} .. {hi:,.0f} bytes")
        return MpqError(f"no plan fits {budget:,.0f} bytes ({budget / 2**20:.3f} MiB); feasible budgets: {lo:,.0f} .. {hi:,.0f} bytes "
                        f"({lo / 2**20:.3f} .. {hi / 2**20:.3f} MiB)")
    shares = split_target(problem, target, k)
    ranges = ", ".join(f"{g} share {shares[g]:.3f} (feasible {problem.avg_range(g)[0]:.2f}..{problem.avg_range(g)[1]:.2f})"
                       for g in (CONTENT, QUALITY) if problem.members(g))
    lo, hi = problem.avg_range()
    return MpqError(f"target {target} bits with K={k} is infeasible within +-{band}: {ranges}; overall average bits can be {lo:.2f}..{hi:.2f}")


def compare_report(problem: Problem, given: Mapping[str, int], best: Solution) -> str:
    d0, d1 = describe(problem, given), best.details
    lines = [f"{'':24}{'given plan':>16}{'optimal plan':>16}"]
    for key in ("content_objective", "quality_objective", "content_avg_bits", "quality_avg_bits", "avg_bits", "bytes"):
        if key in d0:
            lines.append(f"{key:24}{d0[key]:>16.6g}{d1.get(key, float('nan')):>16.6g}")
    lines.append(f"solver: {best.status}, gap {best.gap:.2e}, {best.seconds:.2f} s")
    return "\n".join(lines)
