"""PTQ calibration cost: one candidate bit vs all of them, in one process.

The calibration pass (weight scales for each bit + one activation-range pass
over the calibration data) is timed for bits [8] and for [2, 4, 8]; the
ratio is the price of calibrating every candidate at once (goal <= 1.3x).

    python benchmarks/bench_ptq.py                       # tiny model + SDXL UNet (bf16, 64x64 latents)
    python benchmarks/bench_ptq.py --device cuda         # same on a GPU
    python benchmarks/bench_ptq.py --skip-sdxl
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from mpq.calibration.ptq import calibrate
from mpq.models import load_arch
from mpq.quant.model import QuantModel
from mpq.runner.config import load_config

from _measure import peak_mb
from _synthetic import random_denoiser, synthetic_calib


def bench(label: str, cfg_name: str, overrides: list[str], n: int, device: torch.device, repeats: int) -> list[str]:
    cfg = load_config(cfg_name, overrides + [f"model.device={device.type}", f"calib.batch_size={min(n, 8)}"])
    arch = load_arch(cfg)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.model.dtype]
    t0 = time.perf_counter()
    den = random_denoiser(arch, dtype, device)
    calib = synthetic_calib(den, arch, cfg.sampling.resolution, n, batch=min(n, 8))
    build_s = time.perf_counter() - t0
    qm = QuantModel(den)
    rows = []
    times: dict[str, float] = {}
    for bits in ([8], list(cfg.quant.bits)):
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = calibrate(qm, calib, cfg, bits=bits, show=False)["total_s"]
            best = min(best, t)
        times[str(bits)] = best
    one, all_ = times["[8]"], times[str(list(cfg.quant.bits))]
    rows.append(
        f"| {label} | {device.type} | {cfg.model.dtype} | {len(qm.layers)} | {n} | {one:.3f} | {all_:.3f} | "
        f"{all_ / one:.2f}x | {peak_mb(device):,.0f} | {build_s:.1f} |"
    )
    del qm, den, calib
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sdxl", action="store_true", help="only the tiny model")
    ap.add_argument("--sdxl-samples", type=int, default=2, help="calibration samples for the SDXL row")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(
        "| model | device | dtype | layers | calib samples | 1 bit [8] (s) | all bits [2,4,8] (s) | ratio | peak mem "
        "(MB) | build (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in bench("tiny-sdxl", "tiny-sdxl", [], 32, device, args.repeats):
        print(row, flush=True)
    if not args.skip_sdxl:
        for row in bench(
            "SDXL UNet (random weights, 64x64 latents)",
            "sdxl-turbo",
            ["model.dtype=bf16"],
            args.sdxl_samples,
            device,
            args.repeats,
        ):
            print(row, flush=True)


if __name__ == "__main__":
    main()
