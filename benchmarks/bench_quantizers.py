"""Which weight quantizer wins at equal bytes: every level set x granularity x range option, uniform plans.

    python benchmarks/bench_quantizers.py                 # tiny-sdxl, 48 held-out prompts
    python benchmarks/bench_quantizers.py --bits 3 4 5 --n 24

For each option (``quant.weight``: levels, granularity, group size, min-max or MSE range) and each uniform
weight bit-width: the bytes (packed integers + every stored scale/offset at 2 bytes) and the image MSE
against FP on held-out prompts and seeds (mean over images). Then, per bit-width, each option's MSE
relative to MixDQ's convention (symmetric, per channel, min-max) with a paired-bootstrap 95% interval,
and its bytes relative to it: the table the defaults are chosen from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _imagebench import ImageBench  # noqa: E402

from mpq.metrics import paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402

OPTIONS = [
    WeightQuant("symmetric", "channel"),  # MixDQ
    WeightQuant("symmetric", "channel", method="mse"),
    WeightQuant("symmetric", "kernel"),
    WeightQuant("asymmetric", "channel"),
    WeightQuant("asymmetric", "channel", method="mse"),
    WeightQuant("asymmetric", "kernel"),
    WeightQuant("asymmetric", "kernel", method="mse"),
    WeightQuant("symmetric", "group", 32),
    WeightQuant("asymmetric", "group", 32),
    WeightQuant("asymmetric", "group", 64),
    WeightQuant("asymmetric", "group", 128),
    WeightQuant("asymmetric", "group", 64, method="mse"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts (one seed each)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--options", nargs="*", help="labels to keep (default: all)")
    args = ap.parse_args()
    bench = ImageBench(args.config, args.n)
    options = [o for o in OPTIONS if not args.options or o.label in args.options]
    results: dict[tuple[str, int], tuple[float, object]] = {}
    print(f"\n{args.config}: uniform weight-only plans, {args.n} held-out prompts; MSE vs FP (mean over images)\n")
    print("| quantizer | bits | bytes | MSE vs FP |")
    print("|---|---|---|---|")
    for wq in options:
        bench.calibrate(wq, sorted(set(args.bits)))
        for b in args.bits:
            nbytes, mse = bench.mpq_point(BitPlan.uniform(bench.names, b, None), wq)
            results[(wq.label, b)] = (nbytes, mse)
            print(f"| {wq.label} | {b} | {nbytes:,.0f} | {mse.mean():.3g} |", flush=True)
    base = OPTIONS[0].label
    print(f"\nRelative to {base} at the same bits (MSE ratio, paired bootstrap 95% interval; bytes ratio):\n")
    print("| quantizer | " + " | ".join(f"W{b} MSE x | W{b} bytes x" for b in args.bits) + " |")
    print("|---|" + "---|---|" * len(args.bits))
    for wq in options:
        cells = []
        for b in args.bits:
            nb, mse = results[(wq.label, b)]
            nb0, mse0 = results[(base, b)]
            r, lo, hi = paired_bootstrap_ratio(mse, mse0)
            cells += [f"{r:.2f} ({lo:.2f}-{hi:.2f})", f"{nb / nb0:.3f}"]
        print(f"| {wq.label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
