"""How much of the trade-off does the K sweep span? Both search modes at the same budget, side by side.

For each K in the sweep, the plan at a fixed average-bit target (default 4.0 for weights) in mpq mode
(byte budget) and in reference mode (MixDQ's two programs), and their content/quality average bits.
The sensitivity comes from a run directory (``--run``) or from MixDQ's published SDXL-Turbo files
(``--mixdq DIR``: the ``mixed_precision_scripts`` folder of thu-nics/MixDQ, with the real SDXL layer
sizes from the shipped architecture, built offline).

    python benchmarks/bench_k_sweep.py --mixdq /path/to/MixDQ/mixed_precision_scripts
    python benchmarks/bench_k_sweep.py --run outputs/tiny-sdxl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpq.cost import CostModel
from mpq.layers import meta_layers
from mpq.runner.config import load_config, target_bits
from mpq.runner.rundir import RunDir
from mpq.search.build import act_protect_list, allowed_bits, build_problem, run_entries, run_problem
from mpq.search.mixdq_files import read_sensitivity
from mpq.search.sweep import solve_point, sweep_values


def mixdq_problem(folder: Path, kind: str, protect: bool):
    cfg = load_config("sdxl-turbo")
    log = folder / "sensitivity_log" / "sdxl_turbo" / kind
    ssim = read_sensitivity(next((log / "ssim").glob("*/sensitivity.yaml")), 3)
    sqnr = read_sensitivity(next((log / "sqnr").glob("*/sensitivity.yaml")), 3)
    entries = run_entries(kind, meta_layers(cfg), CostModel.from_config(cfg))
    prot = act_protect_list(entries, ssim, sqnr, [2, 4, 8], 1.0, 8) if protect and kind == "act" else []
    return cfg, build_problem(kind, entries, ssim, sqnr, [2, 4, 8], allowed_bits(cfg.search[kind]), prot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mixdq", type=Path, help="MixDQ's mixed_precision_scripts folder")
    src.add_argument("--run", type=Path, help="an mpq run directory with sensitivity files")
    ap.add_argument("--kind", default="weight", choices=("weight", "act"))
    ap.add_argument("--target", type=float, default=None, help="average bits (default: search.<kind>.target_bitwidth)")
    ap.add_argument(
        "--k", nargs=3, type=float, default=None, metavar=("MIN", "MAX", "NUM"), help="K sweep (default: the config's)"
    )
    args = ap.parse_args()
    if args.mixdq:
        cfg, problem = mixdq_problem(args.mixdq, args.kind, protect=True)
        source = f"MixDQ's published SDXL-Turbo {args.kind} sensitivity, SDXL layer sizes"
    else:
        run = RunDir(args.run)
        cfg = run.load_config()
        problem = run_problem(cfg, run, args.kind)[0]
        source = f"{args.run} ({cfg.model.id})"
    kc = cfg.search[args.kind]
    target = args.target if args.target is not None else target_bits(cfg.search, args.kind, problem.avg_range()[1])
    ks = sweep_values(args.k[0], args.k[1], int(args.k[2])) if args.k else sweep_values(kc.k_min, kc.k_max, kc.k_num)
    print(f"{source}: target {target} average bits, K over {ks[0]}..{ks[-1]} ({len(ks)} values)\n")
    print(
        "| K | mpq: content / quality avg bits | mpq bytes | reference: content / quality avg bits | reference bytes |"
    )
    print("|---|---|---|---|---|")
    spans: dict[str, list[tuple[float, float]]] = {"mpq": [], "reference": []}
    for k in ks:
        cells = []
        for mode in ("mpq", "reference"):
            sol = solve_point(problem, mode, target, k, cfg.search)
            if sol.plan:
                c, q = sol.details["content_avg_bits"], sol.details["quality_avg_bits"]
                spans[mode].append((c, q))
                cells += [f"{c:.2f} / {q:.2f}", f"{sol.details['bytes']:,.0f}"]
            else:
                cells += [sol.status, ""]
        print(f"| {k:.2f} | " + " | ".join(cells) + " |", flush=True)
    print()
    for mode, pts in spans.items():
        if pts:
            cs, qs = [p[0] for p in pts], [p[1] for p in pts]
            print(
                f"{mode}: content {min(cs):.2f}..{max(cs):.2f}, quality {min(qs):.2f}..{max(qs):.2f} "
                f"({len(pts)}/{len(ks)} feasible)"
            )


if __name__ == "__main__":
    main()
