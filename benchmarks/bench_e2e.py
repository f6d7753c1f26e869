"""The whole search, stage by stage, on a fresh run directory (default: the embedded tiny model).

    python benchmarks/bench_e2e.py [--config tiny-sdxl] [key=value ...]

Prints each stage's wall time (from its stamp) and the total; the README's
main job must finish in <= 5 minutes on 2 cores (goal 3).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mpq.commands.main import main as mpq_main

STAGES = ("calib", "ptq", "sensitivity", "search", "select", "final", "report")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        code = mpq_main(["run", "--config", args.config, "--outdir", str(run), *args.overrides])
        total = time.perf_counter() - t0
        if code:
            raise SystemExit(code)
        print("\n| stage | seconds |\n|---|---|")
        for s in STAGES:
            print(f"| {s} | {json.loads((run / '.stamps' / f'{s}.json').read_text())['seconds']:.1f} |")
        print(f"| **total, wall (incl. model load)** | **{total:.1f}** |")


if __name__ == "__main__":
    main()
