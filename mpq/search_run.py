"""The search stage around the pure solver: sensitivity files in, candidate plans out.

Builds :class:`mpq.search.Problem` from a run directory (sizes from the
model's layer table, bytes from the quantizer layout) or from MixDQ files
(sensitivity yamls + a tensor-size ratio file), sweeps budgets x K, writes
one plan yaml per distinct plan, ``pareto.csv`` and the Pareto plot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mpq.progress import progress as tqdm

from mpq.errors import MpqError
from mpq.groups import CONTENT, QUALITY
from mpq.io import read_yaml, write_csv, write_text
from mpq.plan import act_bytes, weight_bytes, write_layer_list, write_plan
from mpq.search import Problem, Solution, solve_mpq, solve_reference

KINDS = ("weight", "act")
MAX_SQNR_DB = 150.0  # +inf SQNR (a bit-exact layer) is clipped here: fp32 carries ~150 dB


# ------------------------------------------------------------------------------ inputs
def read_sensitivity(path: str | Path, n_bits: int) -> dict[str, list[float]]:
    """A MixDQ sensitivity yaml: {layer: [metric at each candidate bit]}."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise MpqError(f"{path}: a sensitivity file maps layer name -> list of {n_bits} values")
    out: dict[str, list[float]] = {}
    for name, values in data.items():
        if not isinstance(values, list) or len(values) != n_bits:
            raise MpqError(f"{path}: layer '{name}' has {values!r}; expected a list of {n_bits} values (one per candidate bit)")
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError):
            raise MpqError(f"{path}: layer '{name}' has non-numeric values {values!r}") from None
        if any(math.isnan(v) or v == -math.inf for v in vals):
            raise MpqError(f"{path}: layer '{name}' has values {values!r}; re-run the sensitivity stage")
        out[str(name)] = [min(v, MAX_SQNR_DB) for v in vals]
    return out


@dataclass(frozen=True)
class SizedLayer:
    name: str
    group: str
    numel: int  # weight elements (weight kind) or input-activation elements (act kind)
    n_scales: int  # weight scales stored (output channels x input parts for per-channel)
    n_parts: int = 1  # activation quantizers (a split concatenated input: 2)
    fp_numel: int = 0  # activation elements kept FP (the BOS token of a BOS-aware layer)


def build_problem(
    kind: str,
    layers: Sequence[SizedLayer],
    ssim: Mapping[str, list[float]],
    sqnr: Mapping[str, list[float]],
    cand_bits: Sequence[int],
    allowed: Mapping[str, Sequence[int]],
    protect: Sequence[str] = (),
    scale_bytes: int = 2,
    fp_bytes: int = 2,
) -> Problem:
    """Content layers are scored by SSIM, quality layers by SQNR; protected layers stay FP."""
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
        sizes.append(layer.numel)
        if layer.name in protected:
            bits.append([]), scores.append([]), nbytes.append([])
            fixed += act_bytes(layer.numel, None, scale_bytes, fp_bytes) if kind == "act" else weight_bytes(layer.numel, layer.n_scales, None, scale_bytes, fp_bytes)
            continue
        ok = [b for b in cand_bits if b in allowed[layer.group]]
        bits.append(ok)
        scores.append([table[layer.name][list(cand_bits).index(b)] for b in ok])
        nbytes.append([act_bytes(layer.numel, b, scale_bytes, fp_bytes, layer.n_parts, layer.fp_numel) if kind == "act"
                       else weight_bytes(layer.numel, layer.n_scales, b, scale_bytes) for b in ok])
    return Problem(names, groups, np.asarray(sizes, dtype=np.float64), bits, scores, nbytes, fixed)


def act_protect_list(layers: Sequence[SizedLayer], ssim: Mapping[str, list[float]], sqnr: Mapping[str, list[float]],
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


def layers_from_run(cfg: Any, kind: str) -> list[SizedLayer]:
    from mpq.layer_table import layer_table

    per_channel = cfg.quant.weight.granularity == "channel"
    if kind == "weight":
        return [SizedLayer(i.name, i.group, i.weight_numel, (i.out_channels if per_channel else 1) * i.n_parts) for i in layer_table(cfg)]
    return [SizedLayer(i.name, i.group, i.act_numel, 0, i.n_parts, i.bos_numel) for i in layer_table(cfg)]


def layers_from_ratio_file(path: str | Path, ssim: Mapping[str, list[float]], sqnr: Mapping[str, list[float]]) -> list[SizedLayer]:
    """MixDQ mode: sizes are the ratio file's relative sizes; content = the SSIM file's layers."""
    ratios = read_yaml(path)
    if not isinstance(ratios, dict) or not ratios:
        raise MpqError(f"{path}: a tensor-size file maps layer name -> relative size")
    unknown = [n for n in list(ssim) + list(sqnr) if n not in ratios]
    if unknown:
        raise MpqError(f"{path} has no size for layer '{unknown[0]}' named in a sensitivity file")
    names = list(sqnr) + [n for n in ssim if n not in sqnr]
    return [SizedLayer(n, CONTENT if n in ssim else QUALITY, float(ratios[n]), 0) for n in names]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sweep
def sweep_values(start: float, stop: float, num: int) -> list[float]:
    return [round(float(v), 4) for v in np.linspace(start, stop, num)] if num > 1 else [round(float(stop), 4)]


def sweep_grid(s: Any, kind: str, target: float | None = None) -> tuple[list[float], list[float]]:
    """(average-bit targets, K values) of a sweep: linspace(target - sweep_span, target, sweep_steps) x
    linspace(k_min, k_max, k_num); ``target`` defaults to ``search.<kind>.target_bitwidth``."""
    kc = s[kind]
    top = kc.target_bitwidth if target is None else target
    return sweep_values(top - s.sweep_span, top, s.sweep_steps), sweep_values(kc.k_min, kc.k_max, kc.k_num)


def budget_for_avg(problem: Problem, avg_bits: float) -> float:
    """Bytes of a plan whose every quantized layer has ``avg_bits`` (fractional) bits, scales included."""
    total = problem.fixed_bytes
    for i in range(len(problem.names)):
        if problem.bits[i]:
            overhead = problem.bytes[i][0] - problem.sizes[i] * problem.bits[i][0] / 8.0
            total += problem.sizes[i] * avg_bits / 8.0 + max(overhead, 0.0)
    return total


def solve_point(problem: Problem, mode: str, target: float, k: float, s: Any, budget_bytes: float | None = None) -> Solution:
    if mode == "reference":
        return solve_reference(problem, target, k, s.band, s.solver, s.time_limit_s)
    budget = budget_bytes if budget_bytes is not None else budget_for_avg(problem, target)
    return solve_mpq(problem, budget, k, s.solver, s.time_limit_s, s.band)


def plan_key(plan: Mapping[str, int]) -> str:
    return hashlib.sha256(repr(sorted(plan.items())).encode()).hexdigest()[:16]


CSV_COLUMNS = ("kind", "mode", "target_avg_bits", "K", "budget_bytes", "status", "gap", "content_objective", "quality_objective",
               "content_norm_objective", "quality_norm_objective", "avg_bits", "content_avg_bits", "quality_avg_bits", "bytes", "pareto", "plan_file")


def run_sweep(problem: Problem, kind: str, mode: str, targets: Sequence[float], ks: Sequence[float], s: Any,
              outdir: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Solve every (target, K); write each distinct plan once as ``<kind>_<target>_<K>.yaml``."""
    rows: list[dict[str, Any]] = []
    written: dict[str, str] = {}
    points = [(t, k) for t in targets for k in ks]
    for t, k in tqdm(points, desc=f"search: {kind} plans", unit="plan", disable=not progress, leave=False):
        budget = budget_for_avg(problem, t) if mode == "mpq" else float("nan")
        if mode == "mpq" and budget < problem.bytes_range()[0]:
            sol = Solution({}, "INFEASIBLE", float("nan"), float("nan"), float("nan"), 0.0)
        else:
            sol = solve_point(problem, mode, t, k, s, budget if mode == "mpq" else None)
        row: dict[str, Any] = {"kind": kind, "mode": mode, "target_avg_bits": t, "K": k, "budget_bytes": budget,
                               "status": sol.status, "gap": sol.gap, "plan_file": "", "_seconds": sol.seconds}
        for c in CSV_COLUMNS:
            row.setdefault(c, sol.details.get(c, float("nan")))
        if sol.plan:
            key = plan_key(sol.plan)
            if key not in written:
                written[key] = f"{kind}_{t:.2f}_{k:.2f}.yaml"
                write_plan(outdir / written[key], sol.plan)
            row["plan_file"] = written[key]
            row["_plan"] = sol.plan
        rows.append(row)
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """A row is on the front if no other feasible row of its kind has <= bytes and >= both group objectives (one strictly)."""
    ok = [r for r in rows if r.get("_plan")]
    for r in rows:
        r["pareto"] = False
    for r in ok:
        vr = (r["bytes"], -r.get("content_norm_objective", 0.0), -r.get("quality_norm_objective", 0.0))
        dominated = False
        for o in ok:
            if o is r or o["kind"] != r["kind"]:
                continue
            vo = (o["bytes"], -o.get("content_norm_objective", 0.0), -o.get("quality_norm_objective", 0.0))
            if all(a <= b + 1e-12 for a, b in zip(vo, vr)) and any(a < b - 1e-12 for a, b in zip(vo, vr)):
                dominated = True
                break
        r["pareto"] = not dominated


def write_pareto_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_csv(path, rows, CSV_COLUMNS)


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path, chosen: Mapping[str, str] | None = None) -> None:
    """Bytes vs combined normalized objective per kind; the front connected; a chosen plan starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mpq.io import write_with

    kinds = [k for k in KINDS if any(r["kind"] == k and r.get("plan_file") for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6 * max(1, len(kinds)), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = [r for r in rows if r["kind"] == kind and r.get("plan_file")]
        x = np.array([r["bytes"] / 2**20 for r in pts])
        y = np.array([r.get("content_norm_objective", 0.0) + r.get("quality_norm_objective", 0.0) for r in pts])
        ks = np.array([r["K"] for r in pts])
        sc = ax.scatter(x, y, c=ks, cmap="viridis", s=18, label="candidates")
        front = sorted((xi, yi) for xi, yi, r in zip(x, y, pts) if r["pareto"])
        if front:
            ax.plot(*zip(*front), color="crimson", lw=1.2, label="Pareto front")
        if chosen and chosen.get(kind):
            sel = [(xi, yi) for xi, yi, r in zip(x, y, pts) if r["plan_file"] == chosen[kind]]
            if sel:
                ax.scatter(*sel[0], marker="*", s=220, color="gold", edgecolor="black", zorder=5, label="chosen")
        fig.colorbar(sc, ax=ax, label="K")
        ax.set_xlabel(f"{kind} bytes (MiB)" + (" per sample, summed over layers" if kind == "act" else ""))
        ax.set_ylabel("normalized objective (content + quality)")
        ax.set_title(f"{kind} candidates ({pts[0]['mode']} mode)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ------------------------------------------------------------------------------ stage entry points
def _allowed(kc: Any) -> dict[str, list[int]]:
    return {CONTENT: list(kc.bits_content), QUALITY: list(kc.bits_quality)}


def _sensitivities(folder: Path, kind: str, n_bits: int, hint: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    paths = [folder / f"{kind}_{m}.yaml" for m in ("ssim", "sqnr")]
    for p in paths:
        if not p.is_file():
            raise MpqError(f"{p} is missing; {hint}")
    return read_sensitivity(paths[0], n_bits), read_sensitivity(paths[1], n_bits)


def run_problem(cfg: Any, run: Any, kind: str) -> tuple[Problem, list[str]]:
    """The ``kind`` problem of a run directory, and its act-protect list (empty for weights)."""
    cand = list(cfg.quant.bits)
    ssim, sqnr = _sensitivities(run.root / "sensitivity", kind, len(cand), f"run `mpq sensitivity --base_path {run.root}` first")
    layers = layers_from_run(cfg, kind)
    kc = cfg.search[kind]
    protect = act_protect_list(layers, ssim, sqnr, cand, cfg.search.act_protect_percent, cfg.search.act_protect_bit) if kind == "act" else []
    s = cfg.search
    return build_problem(kind, layers, ssim, sqnr, cand, _allowed(kc), protect, s.scale_bytes, s.fp_bytes), protect


def run_search(cfg: Any, run: Any, kinds: Sequence[str] = KINDS, progress: bool = True) -> list[dict[str, Any]]:
    """The search stage: candidates/{weight,act}/*.yaml, candidates/pareto.csv, report/pareto.png."""
    out = run.root / "candidates"
    all_rows: list[dict[str, Any]] = []
    for kind in kinds:
        problem, protect = run_problem(cfg, run, kind)
        if kind == "act":
            write_protect_list(out, protect)
        targets, ks = sweep_grid(cfg.search, kind)
        folder = out / kind
        for old in folder.glob("*.yaml"):
            old.unlink()
        all_rows += run_sweep(problem, kind, cfg.search.mode, targets, ks, cfg.search, folder, progress)
    write_pareto_csv(out / "pareto.csv", all_rows)
    plot_pareto(all_rows, run.root / "report" / "pareto.png")
    return all_rows


def reference_problem(kind: str, ssim_path: str, sqnr_path: str, ratio_path: str, cfg: Any, protect_path: str | None = None,
                      protect_out: Path | None = None) -> Problem:
    """A problem from MixDQ files: sizes are the ratio file's (so bytes are in ratio units). For activations
    without ``protect_path``, the act-protect list is derived by MixDQ's rule and written to ``protect_out``
    (``act_protect.pt`` + ``.txt``)."""
    from mpq.plan import read_layer_list

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
    return build_problem(kind, layers, ssim, sqnr, cand, _allowed(cfg.search[kind]), protect, 0, cfg.search.fp_bytes)


def write_protect_list(folder: Path, names: Sequence[str]) -> None:
    """``act_protect.pt`` (MixDQ: a torch.save'd list) and ``act_protect.txt`` (one name a line)."""
    write_layer_list(folder / "act_protect.pt", names)
    write_text(folder / "act_protect.txt", "".join(n + "\n" for n in names))


def feasible_error(problem: Problem, mode: str, target: float, k: float, band: float, budget: float | None = None) -> MpqError:
    """The one-line error for an impossible point, giving the feasible range (``budget``: bytes, mpq mode)."""
    if mode == "mpq":
        lo, hi = problem.bytes_range()
        budget = budget_for_avg(problem, target) if budget is None else budget
        return MpqError(f"no plan fits {budget:,.0f} bytes ({budget / 2**20:.3f} MiB); feasible budgets: {lo:,.0f} .. {hi:,.0f} bytes "
                        f"({lo / 2**20:.3f} .. {hi / 2**20:.3f} MiB)")
    from mpq.search import split_target

    shares = split_target(problem, target, k)
    ranges = ", ".join(f"{g} share {shares[g]:.3f} (feasible {problem.avg_range(g)[0]:.2f}..{problem.avg_range(g)[1]:.2f})" for g in (CONTENT, QUALITY) if problem.members(g))
    lo, hi = problem.avg_range()
    return MpqError(f"target {target} bits with K={k} is infeasible within +-{band}: {ranges}; overall average bits can be {lo:.2f}..{hi:.2f}")


def compare_report(problem: Problem, given: Mapping[str, int], best: Solution) -> str:
    from mpq.search import describe

    d0, d1 = describe(problem, given), best.details
    lines = [f"{'':24}{'given plan':>16}{'optimal plan':>16}"]
    for key in ("content_objective", "quality_objective", "content_avg_bits", "quality_avg_bits", "avg_bits", "bytes"):
        if key in d0:
            lines.append(f"{key:24}{d0[key]:>16.6g}{d1.get(key, float('nan')):>16.6g}")
    lines.append(f"solver: {best.status}, gap {best.gap:.2e}, {best.seconds:.2f} s")
    return "\n".join(lines)
