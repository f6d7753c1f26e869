"""Scale-out, measured: 1 vs 2 processes on the embedded model; SDXL-Turbo projected from measured per-item costs.

    python benchmarks/bench_distributed.py [--base_path DIR] [--skip-tiny] [--skip-sdxl] [--nproc 2]

1. Embedded model, default config: ``mpq sensitivity`` and ``mpq select`` in one process with one thread,
   in ``--nproc`` processes with one thread each (gloo), and in one process with all the cores (context);
   wall seconds, speed-up, each rank's idle fraction, and whether the files are byte-identical.
2. Full-size SDXL UNet architecture (random weights, fp32, CPU): one forward with each quantizable layer's
   start time recorded; an item's measured cost is the rest of the forward after its layer (what the prefix
   cache computes) per candidate bit and sample. The sensitivity work of MixDQ's setting (794 layers, W and A,
   32 samples; 420 content layers x 32 images for SSIM) is then assigned to 1 and to 8 workers as mpq assigns
   it; projected makespans and idle fractions. A GPU's forward time scales every row alike (``--forward-s``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpq.runner.distributed import assign

ROOT = Path(__file__).resolve().parent.parent


def mpq(args: list[str], threads: int | None, nproc: int | None = None) -> float:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "mpq", *args] + (["--nproc", str(nproc)] if nproc else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def tiny(base: Path, nproc: int) -> None:
    cores = os.cpu_count() or 1
    prepared = base / "prepared"
    if not (prepared / "ckpt.safetensors").is_file():
        mpq(["ptq", "--config", "tiny-sdxl", "--base_path", str(prepared)], None)
    sens_files = [f"sensitivity/{k}_{m}.yaml" for k in ("weight", "act") for m in ("sqnr", "ssim")]
    sel_files = [f"selection/{k}_scores.csv" for k in ("weight", "act")] + [
        "selection/final_weight.yaml",
        "selection/final_act.yaml",
    ]
    runs = {}
    for label, threads, n in (
        ("1 process x 1 thread", 1, None),
        (f"{nproc} processes x 1 thread", 1, nproc),
        (f"1 process x {cores} threads", cores, None),
    ):
        d = base / label.replace(" ", "_")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(prepared, d)
        t_sens = mpq(["sensitivity", "--base_path", str(d)], threads, n)
        mpq(["search", "--base_path", str(d)], None)
        t_sel = mpq(["select", "--base_path", str(d)], threads, n)
        runs[label] = (d, t_sens, t_sel)
    ref, t1, s1 = runs["1 process x 1 thread"]
    print(
        f"\n### Embedded model (tiny-sdxl, default config), CPU with {cores} cores: wall seconds incl. process start\n"
    )
    print(
        "| setting | sensitivity | speed-up | select | speed-up | files vs 1 process x 1 thread | idle per rank "
        "(sensitivity) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, (d, ts, tl) in runs.items():
        same = same_files(ref, d, sens_files + sel_files)
        idle = ""
        dj = d / "sensitivity" / "distributed.json"
        if dj.is_file() and label.startswith(f"{nproc} processes"):
            data = json.loads(dj.read_text())
            idle = "; ".join(f"{k}: " + "/".join(f"{r['idle_fraction']:.0%}" for r in v) for k, v in data.items())
        print(
            f"| {label} | {ts:.1f} | {t1 / ts:.2f}x | {tl:.1f} | {s1 / tl:.2f}x | {'identical' if same else 'differ'} "
            f"| {idle} |",
            flush=True,
        )


def sdxl(forward_s: float | None) -> None:
    from mpq.layers import CONTENT, assign_groups
    from mpq.models import load_arch
    from mpq.quant.model import QuantModel
    from mpq.runner.config import load_config

    from _synthetic import random_denoiser, synthetic_calib

    cfg = load_config("sdxl-turbo", ["model.device=cpu"])
    arch = load_arch(cfg)
    den = random_denoiser(arch, torch.float32, "cpu")
    qm = QuantModel(den)
    kwargs = next(iter(synthetic_calib(den, arch, cfg.sampling.resolution, 1).batches(1, torch.device("cpu"))))[0]
    starts: dict[str, float] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, n=name: starts.setdefault(n, time.perf_counter()) and None)
        for name, layer in qm.layers.items()
    ]
    with torch.no_grad():
        t0 = time.perf_counter()
        qm(**kwargs, return_dict=False)
        total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    scale = (forward_s / total) if forward_s else 1.0
    rest = {n: (total - (starts[n] - t0)) * scale for n in qm.names}  # measured: the forward after the layer starts
    full = total * scale
    groups = assign_groups(qm.names, list(cfg.groups.content), warn=False)
    content = [n for n in qm.names if groups[n] == CONTENT]
    bits, samples, images = 3, 32, cfg.sensitivity.num_images
    phases = {
        "weight sqnr": {n: bits * samples * rest[n] for n in qm.names},
        "act sqnr": {n: bits * samples * rest[n] for n in qm.names},
        "weight ssim": {n: bits * images * rest[n] for n in content},
        "act ssim": {n: bits * images * rest[n] for n in content},
    }
    naive = sum(len(c) * bits * (samples if "sqnr" in k else images) * full for k, c in phases.items())
    src = f"GPU forward {forward_s:.2f} s (given)" if forward_s else f"this CPU, fp32, measured {total:.1f} s a forward"
    print(
        f"\n### SDXL-Turbo sensitivity, projected ({len(qm.names)} layers, {len(content)} content; {bits} bits x W/A; "
        f"{samples} samples / {images} images; per-item costs from {src}; SSIM items count the denoiser only)\n"
    )
    print("| workers | prefix-cache sensitivity (h) | speed-up | idle fraction per worker, max | naive, 1 worker (h) |")
    print("|---|---|---|---|---|")
    one = sum(sum(c.values()) for c in phases.values())
    for w in (1, 8):
        span, idle = 0.0, 0.0
        for costs in phases.values():
            owner = assign(costs, w)
            load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(w)]
            span += max(load)
            idle = max(idle, 1 - min(load) / max(load))
        print(f"| {w} | {span / 3600:.2f} | {one / span:.2f}x | {idle:.1%} | {naive / 3600:.2f} |")
    rr = 0.0
    for costs in phases.values():  # round-robin by count, for comparison
        load = [sum(c for i, c in enumerate(costs.values()) if i % 8 == r) for r in range(8)]
        rr += max(load)
    print(f"| 8, round-robin by count | {rr / 3600:.2f} | {one / rr:.2f}x | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_path", default=None, help="work folder for the tiny runs (default: a temp folder)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument(
        "--forward-s", type=float, default=None, help="SDXL: seconds of one denoiser forward on the target GPU"
    )
    args = ap.parse_args()
    if not args.skip_tiny:
        tiny(Path(args.base_path or tempfile.mkdtemp(prefix="mpq-bench-dist-")), args.nproc)
    if not args.skip_sdxl:
        sdxl(args.forward_s)


if __name__ == "__main__":
    main()
