"""Every denoiser family: what mpq finds in it, and what each stage costs.

    python benchmarks/bench_families.py                  # tiny variants (main job) + the real configs on meta
    python benchmarks/bench_families.py --full           # + full-size random-weights configs, small resolution
    python benchmarks/bench_families.py --full --configs sd15-random pixart-sigma-random

Table 1: per family, the tiny random variant's whole ``mpq run`` (wall seconds on
this machine, peak RSS) and what its calibrated run found: quantizable, content,
BOS-aware (constant first text token, found from the recorded text) and
split-input layers. Table 2: the real configs' layer tables on the meta device
(no weights; BOS-aware as the family's published text encoders make it).
Table 3 (``--full``): each full-size random-weights config (``<name>-random``:
the real denoiser, stand-in text encoders) at its small resolution on CPU,
stage by stage in its own process: seconds and peak RSS for calib, PTQ, and
sensitivity over a layer subset (seconds per scored layer, to project a full
sweep; CPU seconds are not GPU seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ("tiny-sdxl-random", "tiny-pixart-random", "tiny-sd3-random", "tiny-flux-random")
REAL = ("sd15", "sdxl-base", "sdxl-turbo", "pixart-sigma", "sd35-medium", "flux-schnell")
CHILD = (
    "import resource, sys\n"
    "from mpq.commands.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run_mpq(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of ``mpq ARGV`` in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"mpq {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    kb = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return wall, kb / 2**20


def found(run: Path) -> dict[str, int]:
    layers = json.loads((run / "ckpt.json").read_text())["layers"]
    return {
        "layers": len(layers),
        "bos": sum(e["bos_aware"] for e in layers),
        "split": sum(len(e["in_split"]) > 2 for e in layers),
    }


def tiny_table(tmp: Path) -> None:
    from mpq.calibration.checkpoint import run_layers
    from mpq.runner.config import load_config
    from mpq.runner.rundir import RunDir

    print("\n| config | family | layers | content | BOS-aware | split inputs | main job, s | peak RSS, GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in TINY:
        run = tmp / name
        wall, rss = run_mpq(["run", "--config", name, "--outdir", str(run), "model.device=cpu"])
        cfg = load_config(name)
        content = sum(i.group == "content" for i in run_layers(cfg, RunDir(run)))
        f = found(run)
        family = json.loads((run / "ckpt.json").read_text())["family"]
        print(f"| {name} | {family} | {f['layers']} | {content} | {f['bos']} | {f['split']} | {wall:.0f} | {rss:.2f} |")


def meta_table() -> None:
    from mpq.layers import meta_layers
    from mpq.models.loader import arch_family, load_arch
    from mpq.runner.config import load_config

    print("\n| config | denoiser | layers | content | BOS-aware | split inputs | layer weights (M) |")
    print("|---|---|---|---|---|---|---|")
    for name in REAL:
        cfg = load_config(name)
        infos = meta_layers(cfg)
        family = arch_family(load_arch(cfg))
        print(
            f"| {name} | {family.denoiser_class} | {len(infos)} | {sum(i.group == 'content' for i in infos)} | "
            f"{sum(i.bos_aware for i in infos)} | {sum(i.n_parts > 1 for i in infos)} | "
            f"{sum(i.weight_numel for i in infos) / 1e6:,.0f} |"
        )


def subset(name: str, n: int) -> list[str]:
    """``n`` content and ``n`` quality layers spread over the model (the sensitivity subset)."""
    from mpq.layers import meta_layers
    from mpq.runner.config import load_config

    infos = meta_layers(load_config(name))
    out = []
    for group in ("content", "quality"):
        names = [i.name for i in infos if i.group == group]
        out += [names[round(k * (len(names) - 1) / max(1, n - 1)) if n > 1 else len(names) // 2] for k in range(n)]
    return out


def full_table(tmp: Path, configs: list[str], per_group: int) -> None:
    print(
        f"\n| config | resolution | calib s | calib GB | PTQ s | PTQ GB | sensitivity s ({2 * per_group} layers, W+A, "
        "SQNR+SSIM) | s / layer | sensitivity GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    from mpq.runner.config import load_config

    for name in configs:
        run = tmp / name
        layers = subset(name, per_group)
        common = ["--outdir", str(run), "model.device=cpu", f"sensitivity.layers={json.dumps(layers)}"]
        c_s, c_gb = run_mpq(["calib", "--config", name, *common])
        p_s, p_gb = run_mpq(["ptq", "--config", name, *common])
        s_s, s_gb = run_mpq(["sensitivity", "--config", name, *common])
        stamps = {s: json.loads((run / ".stamps" / f"{s}.json").read_text())["seconds"] for s in ("calib", "ptq")}
        sens = json.loads((run / ".stamps" / "sensitivity.json").read_text())["seconds"]
        res = load_config(name).sampling.resolution
        print(
            f"| {name} | {res} | {stamps['calib']:.0f} (wall {c_s:.0f}) | {c_gb:.1f} | {stamps['ptq']:.0f} "
            f"(wall {p_s:.0f}) | {p_gb:.1f} | {sens:.0f} (wall {s_s:.0f}) | {sens / len(layers):.0f} | {s_gb:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also the full-size random-weights configs (slow)")
    ap.add_argument("--configs", nargs="*", default=[f"{r}-random" for r in REAL], help="with --full")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--layers-per-group", type=int, default=1, help="with --full: content and quality layers scored")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tiny:
            tiny_table(Path(tmp))
            meta_table()
        if args.full:
            full_table(Path(tmp), args.configs, args.layers_per_group)


if __name__ == "__main__":
    main()
