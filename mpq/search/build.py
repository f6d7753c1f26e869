"""Building the integer program (:class:`~mpq.search.program.Problem`) from a run, or from MixDQ's files.

Content layers are scored by SSIM, quality layers by SQNR; each allowed bit
costs what :class:`~mpq.cost.CostModel` says (MixDQ-file mode: packed bits of
the ratio file's sizes); act-protected layers stay FP (their bytes are fixed).
Also here: MixDQ's act-protect rule, the budget of an average bit-width, and
the one-line error for an infeasible point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpq.cost import CostModel, weight_bytes
from mpq.errors import MpqError
from mpq.layers import CONTENT, QUALITY, LayerInfo
from mpq.plan import read_layer_list
from mpq.quant.formats import BITS_KEY, Key, nominal_bits, resolve, weight_key
from mpq.quant.structure import PREFIX
from mpq.runner.files import write_layer_list
from mpq.runner.rundir import RunDir
from mpq.search.mixdq_files import read_ratio_file, read_sensitivity
from mpq.search.program import Problem, Solution, describe, split_target


@dataclass(frozen=True)
class Entry:
    """What the program needs of one layer: its name, group, size (elements: the average-bits weight), and price."""

    name: str
    group: str
    size: float
    price: Callable[[Key | None], float]  # bytes at a bit-width or format (None: FP)


def run_entries(kind: str, layers: Sequence[LayerInfo], cost: CostModel) -> list[Entry]:
    """A run's layers, priced by the cost model (weights, or one sample's input activations)."""
    if kind == "act":
        return [Entry(i.name, i.group, i.act_numel, lambda b, i=i: cost.act_bytes(i, b)) for i in layers]
    return [Entry(i.name, i.group, i.weight_numel, lambda b, i=i: cost.weight_bytes(i, b)) for i in layers]


def _finite(row: list[float]) -> list[float]:
    """A layer's scores with +inf (quantizing it left the output exactly unchanged: SQNR of a zero error, e.g. the
    text queries of an MMDiT's last, context-pre-only block, whose outputs are dropped) replaced by its best finite
    score, or 0 if none: every bit then scores the same and the program gives it the fewest bytes."""
    if math.inf not in row:
        return row
    finite = [v for v in row if math.isfinite(v)]
    fill = max(finite) if finite else 0.0
    return [fill if v == math.inf else v for v in row]


def build_problem(
    kind: str,
    entries: Sequence[Entry],
    ssim: Mapping[str, list[float]],
    sqnr: Mapping[str, list[float]],
    cand_bits: Sequence[Key],
    allowed: Mapping[str, Sequence[Key]],
    protect: Sequence[str] = (),
    hint: str = "",
    ties: Sequence[tuple[str, ...]] = (),
) -> Problem:
    """The ``kind`` (weight|act) problem: one entry per layer, protected layers FP with fixed bytes. ``hint`` ends
    the error for a layer missing from a sensitivity file."""
    names, groups, sizes, bits, scores, nbytes, fp = [], [], [], [], [], [], []
    fixed = 0.0
    protected = set(protect)
    for e in entries:
        table = ssim if e.group == CONTENT else sqnr
        metric = "ssim" if e.group == CONTENT else "sqnr"
        if e.name not in table:
            raise MpqError(
                f"the {kind} {metric} sensitivity file has no entry for {e.group} layer '{e.name}'; "
                f"{hint or 're-run the sensitivity stage'}"
            )
        names.append(e.name)
        groups.append(e.group)
        sizes.append(e.size)
        fp.append(e.price(None))
        if e.name in protected:
            bits.append([]), scores.append([]), nbytes.append([])
            fixed += e.price(None)
            continue
        ok = [b for b in cand_bits if b in allowed[e.group]]
        bits.append(ok)
        scores.append(_finite([table[e.name][list(cand_bits).index(b)] for b in ok]))
        nbytes.append([e.price(b) for b in ok])
    return Problem(
        names, groups, np.asarray(sizes, dtype=np.float64), bits, scores, nbytes, fixed, kind, list(ties), fp
    )


def act_protect_list(
    entries: Sequence[Entry],
    ssim: Mapping[str, list[float]],
    sqnr: Mapping[str, list[float]],
    cand_bits: Sequence[int],
    percent: float,
    rank_bit: int,
) -> list[str]:
    """MixDQ's rule: per group, the ceil(``percent`` %) layers whose activations are most damaged at
    ``rank_bit`` bits (lowest SSIM for content, lowest SQNR for quality) stay FP. On MixDQ's published
    SDXL-Turbo activation sensitivity, 1% at A8 gives exactly its shipped 9-layer list."""
    chosen: list[str] = []
    col = list(cand_bits).index(rank_bit)
    for group, table in ((CONTENT, ssim), (QUALITY, sqnr)):
        members = [e.name for e in entries if e.group == group and e.name in table]
        if not members or percent <= 0:
            continue
        n = math.ceil(len(members) * percent / 100.0 - 1e-9)
        chosen += sorted(members, key=lambda name: (table[name][col], name))[:n]
    return chosen


def write_protect_list(path: Path, names: Sequence[str]) -> None:
    """``act_protect.pt`` (MixDQ: a torch.save'd list) at ``path`` and ``act_protect.txt`` (one name a line) beside
    it."""
    from mpq.runner.files import write_text

    write_layer_list(path, names)
    write_text(path.with_suffix(".txt"), "".join(n + "\n" for n in names))


def allowed_bits(kc: Any) -> dict[str, list[Key]]:
    """Each group's allowed candidates (bits, and for weights format names as :func:`weight_key` writes them)."""
    return {CONTENT: [weight_key(b) for b in kc.bits_content], QUALITY: [weight_key(b) for b in kc.bits_quality]}


def every_candidate(cand: Sequence[Key], allowed: Mapping[str, Sequence[Key]]) -> dict[str, list[Key]]:
    """Both groups allowed every integer bit, and every format either group names (a format no group names stays
    out: an integer-only search of a checkpoint with formats stays integer-only below its fewest bits too)."""
    named = {k for keys in allowed.values() for k in keys}
    every = [k for k in cand if resolve(k).config_key == BITS_KEY or k in named]
    return {CONTENT: every, QUALITY: every}


def candidates_of(cfg: Any, kind: str) -> list[Key]:
    """The ``kind``'s candidates in sensitivity-file order: the integer bits, then (weights) the formats."""
    from mpq.runner.config import weight_formats

    return [*cfg.quant.bits, *(weight_formats(cfg) if kind == "weight" else [])]


def run_problem(cfg: Any, run: RunDir, kind: str, every_bit: bool = False) -> tuple[Problem, list[str]]:
    """The ``kind`` problem of a run directory, and its act-protect list (empty for weights); ``every_bit``: every
    candidate bit allowed in both groups (the full sweep below the configured groups' fewest bits)."""
    from mpq.calibration.checkpoint import run_layers

    patterns = list(cfg.sensitivity.layers)
    if patterns:
        raise MpqError(
            f"sensitivity.layers={patterns} restricts the sensitivity files to a subset, but the search needs every "
            "layer: "
            f"set sensitivity.layers=[] and re-run `mpq sensitivity --base_path {run.root}`"
        )
    cand = candidates_of(cfg, kind)
    hint = f"run `mpq sensitivity --base_path {run.root}` first"
    ssim, sqnr = (read_sensitivity(run.require(run.sensitivity_file(kind, m), hint), cand) for m in ("ssim", "sqnr"))
    entries = run_entries(kind, run_layers(cfg, run), CostModel.from_config(cfg))
    s = cfg.search
    protect = (
        act_protect_list(entries, ssim, sqnr, cand, s.act_protect_percent, s.act_protect_bit) if kind == "act" else []
    )
    ties = file_ties(cfg, [e.name for e in entries]) if kind == "weight" else []
    return build_problem(
        kind,
        entries,
        ssim,
        sqnr,
        cand,
        every_candidate(cand, allowed_bits(s[kind])) if every_bit else allowed_bits(s[kind]),
        protect,
        f"delete it and re-run `mpq sensitivity --force --base_path {run.root}`",
        ties,
    ), protect


def check_target_family(cfg: Any, family: str | None = None) -> None:
    """A ``target: gguf`` run of a family no GGUF runtime reads (PixArt) is refused in one line; ``family`` None:
    looked up offline, and left to the search when the architecture is not known offline (a hub id)."""
    from mpq.export.gguf_layout import require_layout
    from mpq.models.loader import arch_family, load_arch

    if cfg.target != "gguf":
        return
    if family is None:
        try:
            family = arch_family(load_arch(cfg)).name
        except MpqError:
            return
    require_layout(family)


def file_ties(cfg: Any, names: Sequence[str]) -> list[tuple[str, ...]]:
    """Layers a GGUF file stores as one tensor (SD3's and Flux's fused qkv, Flux's linear1), as the problem names
    them, when the weight candidates include GGUF types: the search gives each such set one type. None for the
    UNet (its original layout fuses nothing); a ``target: gguf`` run of a family GGUF runtimes do not read (PixArt)
    is refused here, before the search."""
    from mpq.export.gguf_layout import LAYOUTS, fused_layers, layout
    from mpq.models.loader import arch_family, load_arch, meta_denoiser

    if not any(resolve(b).runtime == "gguf" for b in candidates_of(cfg, "weight")):
        return []
    arch = load_arch(cfg)
    family = arch_family(arch).name
    check_target_family(cfg, family)
    if family not in LAYOUTS or family == "unet":
        return []
    den = meta_denoiser(arch)
    fused = fused_layers(layout(family, list(den.state_dict()), den.config))
    known = set(names)
    return [tuple(PREFIX + p for p in tie) for tie in fused if all(PREFIX + p in known for p in tie)]


def ratio_entries(path: str | Path, ssim: Mapping[str, list[float]], sqnr: Mapping[str, list[float]]) -> list[Entry]:
    """MixDQ-file mode: the layers of the sensitivity files (content: those of the SSIM file), sized by MixDQ's
    tensor-size ("ratio") file; a layer costs its packed bits (``size x bits / 8``, no scales), FP 2 bytes an element:
    "bytes" are in ratio units."""
    names = list(sqnr) + [n for n in ssim if n not in sqnr]
    ratios = read_ratio_file(path, names)
    return [
        Entry(
            n,
            CONTENT if n in ssim else QUALITY,
            ratios[n],
            lambda b, r=ratios[n]: weight_bytes(r, 0, None if b is None else nominal_bits(b), 0, 2),
        )  # type: ignore[arg-type]
        for n in names
    ]


def reference_problem(
    kind: str,
    ssim_path: str,
    sqnr_path: str,
    ratio_path: str,
    cfg: Any,
    protect_path: str | None = None,
    protect_out: Path | None = None,
) -> Problem:
    """A problem from MixDQ files: sizes are the ratio file's (so bytes are in ratio units). For activations
    without ``protect_path``, the act-protect list is derived by MixDQ's rule and written to ``protect_out``."""
    cand = candidates_of(cfg, kind)
    ssim, sqnr = read_sensitivity(ssim_path, cand), read_sensitivity(sqnr_path, cand)
    entries = ratio_entries(ratio_path, ssim, sqnr)
    if protect_path:
        protect = read_layer_list(protect_path)
    elif kind == "act":
        protect = act_protect_list(
            entries, ssim, sqnr, cand, cfg.search.act_protect_percent, cfg.search.act_protect_bit
        )
        if protect_out is not None:
            write_protect_list(protect_out / "act_protect.pt", protect)
    else:
        protect = []
    return build_problem(kind, entries, ssim, sqnr, cand, allowed_bits(cfg.search[kind]), protect)


def budget_for_avg(problem: Problem, avg_bits: float) -> float:
    """Bytes of a plan whose every quantized layer has ``avg_bits`` (fractional) code bits, plus its parameter
    bytes. Weights: the fewest parameter bytes (scales, zero points) any of the layer's candidates stores.
    Candidates of one quantizer store the same parameters at every width (MixDQ's integers), so this is their
    overhead; where they differ (SDNQ's default groups shrink with the bits: uint2 stores 4 bits a weight of fp32
    scales and zero points, int8 one scale a row) the budget does not depend on which is listed first.
    Activations: the first (fewest-bits) candidate's, as MixDQ's budgets have always counted them (their bytes
    differ by width only in the FP BOS row and rounding). A layer every candidate prices alike (one that none of them
    stores, kept FP) counts at that price, whatever the average."""
    total = problem.fixed_bytes
    for i in range(len(problem.names)):
        bits, nbytes, size = problem.bits[i], problem.bytes[i], problem.sizes[i]
        fp = problem.fp_prices[i] if problem.fp_prices else math.nan
        if bits and all(b == fp for b in nbytes):  # every candidate keeps it FP (GGUF: rows not whole blocks, convs)
            total += fp
        elif bits:
            # the candidate storing the fewest parameter bytes (the first of equals: MixDQ's fewest bits); its
            # overhead includes its codes' rounding to whole bytes, so that a plan of it alone fills the budget
            params = [b - math.ceil(size * nominal_bits(k) / 8.0) for k, b in zip(bits, nbytes)]
            j = params.index(min(params)) if problem.kind == "weight" else 0
            total += size * avg_bits / 8.0 + max(nbytes[j] - size * nominal_bits(bits[j]) / 8.0, 0.0)
    return total


def feasible_error(
    problem: Problem, mode: str, target: float, k: float, band: float, budget: float | None = None
) -> MpqError:
    """The one-line error for an impossible point, giving the feasible range (``budget``: bytes, mpq mode)."""
    if mode == "mpq":
        lo, hi = problem.bytes_range()
        budget = budget_for_avg(problem, target) if budget is None else budget
        if budget >= lo:
            return MpqError(
                f"no plan fits {budget:,.0f} bytes with K={k} (content avg bits = K x quality avg bits +-{band}); "
                f"try another K or a larger search.band; budgets feasible with some K: {lo:,.0f} .. {hi:,.0f} bytes"
            )
        return MpqError(
            f"no plan fits {budget:,.0f} bytes ({budget / 2**20:.3f} MiB); feasible budgets: {lo:,.0f} .. {hi:,.0f} "
            "bytes "
            f"({lo / 2**20:.3f} .. {hi / 2**20:.3f} MiB)"
        )
    shares = split_target(problem, target, k)
    ranges = ", ".join(
        f"{g} share {shares[g]:.3f} (feasible {problem.avg_range(g)[0]:.2f}..{problem.avg_range(g)[1]:.2f})"
        for g in (CONTENT, QUALITY)
        if problem.members(g)
    )
    lo, hi = problem.avg_range()
    return MpqError(
        f"target {target} bits with K={k} is infeasible within +-{band}: {ranges}; overall average bits can be "
        f"{lo:.2f}..{hi:.2f}"
    )


def compare_report(problem: Problem, given: Mapping[str, int], best: Solution) -> str:
    d0, d1 = describe(problem, given), best.details
    lines = [f"{'':24}{'given plan':>16}{'optimal plan':>16}"]
    for key in ("content_objective", "quality_objective", "content_avg_bits", "quality_avg_bits", "avg_bits", "bytes"):
        if key in d0:
            lines.append(f"{key:24}{d0[key]:>16.6g}{d1.get(key, float('nan')):>16.6g}")
    lines.append(f"solver: {best.status}, gap {best.gap:.2e}, {best.seconds:.2f} s")
    return "\n".join(lines)
