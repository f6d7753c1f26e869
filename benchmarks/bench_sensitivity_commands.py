"""The sensitivity stage as a user runs it: whole commands side by side, exact against each estimator, and where the
time goes.

    python benchmarks/bench_sensitivity_commands.py [--config tiny-sdxl] [--methods fisher local]
        [--load 2] [--env OMP_WAIT_POLICY=PASSIVE] [key=value ...]

1. ``mpq ptq`` into a temporary run (calibration and checkpoint; not timed).
2. Per method, a fresh copy of that run and ``mpq sensitivity --base_path COPY sensitivity.method=M`` in a new
   process, its wall time measured from outside (what a user waits for), beside the time its stage reports
   ("[sensitivity] done in") and the time its progress bars spent in the estimate or the per-layer loops.
3. The floor every command pays before any work: ``python -c "import torch"``, and ``mpq sensitivity`` on a run
   whose four files are finished (start, config, read back; no model is loaded) and a process that loads the
   pipeline and the quantized denoiser only (imports, model construction, checkpoint).
``--load N`` runs N busy processes beside every command (a loaded machine, as CI or a test suite makes it);
``--env K=V`` sets an environment variable for the commands (e.g. OpenMP's wait policy).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD_PY = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"
PIPE_PY = (
    "import sys; from mpq.runner.rundir import RunDir; from mpq.calibration.checkpoint import quantized_pipeline; "
    "run = RunDir(sys.argv[1]); quantized_pipeline(run.load_config(), run, None)"
)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, output) of a command in a new process; a failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall, (p.stdout + p.stderr).replace("\r", "\n")


def bar_seconds(out: str) -> float:
    """Seconds the command's finished progress bars report (the work itself: estimate or per-layer loops)."""
    total = 0.0
    for m in re.finditer(r"100%\|[^|]*\|[^\[]*\[(\d+):(\d+)<", out):
        total += int(m.group(1)) * 60 + int(m.group(2))
    return total


def stage_seconds(out: str, stage: str) -> float:
    m = re.search(rf"\[{stage}\] done in ([\d.]+) s", out)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--methods", nargs="+", default=["fisher", "local"], help="estimators against the exact command")
    ap.add_argument("--load", type=int, default=0, help="busy processes beside every command")
    ap.add_argument("--env", action="append", default=[], help="K=V for the commands' environment")
    ap.add_argument("overrides", nargs="*", help="config overrides for every command")
    args = ap.parse_args()
    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    mpq = [sys.executable, "-m", "mpq"]
    loads = [subprocess.Popen([sys.executable, "-c", LOAD_PY]) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            subprocess.run(
                [*mpq, "ptq", "--config", args.config, "--outdir", str(base), *args.overrides],
                check=True,
                capture_output=True,
                env=env,
            )
            rows: list[tuple[str, float, float, float]] = []
            finished = base
            for method in ["fast", *args.methods]:
                run = Path(tmp) / method
                shutil.copytree(base, run)
                cmd = [*mpq, "sensitivity", "--config", args.config, "--base_path", str(run), *args.overrides]
                wall, out = timed([*cmd, f"sensitivity.method={method}"], env)
                rows.append((method, wall, stage_seconds(out, "sensitivity"), bar_seconds(out)))
                if method == "fast":
                    finished = run
            torch_s, _ = timed([sys.executable, "-c", "import torch"], env)
            read_s, _ = timed(
                [*mpq, "sensitivity", "--config", args.config, "--base_path", str(finished), *args.overrides], env
            )
            pipe_s, _ = timed([sys.executable, "-c", PIPE_PY, str(finished)], env)
    finally:
        for p in loads:
            p.kill()
    exact = rows[0][1]
    print(
        f"{args.config}, {os.cpu_count()} cores, load {args.load} busy processes"
        + (f", env {' '.join(args.env)}" if args.env else "")
        + "\n"
    )
    print("| command | wall s | stage s | progress bars s | wall vs exact | work (wall - pipeline floor) vs exact's |")
    print("|---|---|---|---|---|---|")
    for method, wall, stage, bars in rows:
        label = "exact (fast path, the default)" if method == "fast" else method
        work = wall - pipe_s
        ratio = (exact - pipe_s) / work if work > 0 else float("inf")
        print(f"| {label} | {wall:.1f} | {stage:.1f} | {bars:.0f} | {exact / wall:.1f}x | {work:.1f} s, {ratio:.0f}x |")
    print(
        f"\nfloor: `import torch` {torch_s:.1f} s; `mpq sensitivity` reading back finished files {read_s:.1f} s; "
        f"loading the pipeline and the quantized denoiser {pipe_s:.1f} s (paid by every command that scores)"
    )
    best = min(r[1] for r in rows[1:]) if len(rows) > 1 else float("nan")
    print(
        f"a whole command is at most {exact / pipe_s:.0f}x faster than the exact one here (the pipeline floor); the "
        f"fastest estimator command is {exact / best:.1f}x"
    )


if __name__ == "__main__":
    main()
