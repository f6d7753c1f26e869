"""Sensitivity cost: naive (one full forward per layer x bit x batch) vs mpq's fast path, side by side.

Rows: the tiny model (real run: calibration + PTQ made here, SQNR and SSIM),
and a full-size SDXL UNet architecture (random weights, 64x64 latents, SQNR on
synthetic calibration inputs) over a layer subset spread across the network.
Prints wall time, peak memory, speed-up and the largest score difference.

    python benchmarks/bench_sensitivity.py [--device cuda] [--sdxl-layers 24] [--skip-sdxl]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from mpq.calibration.ptq import calibrate, run_ptq
from mpq.calibration.record import run_calibration
from mpq.models import load_arch, load_pipeline, torch_dtype
from mpq.quant.model import QuantModel
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir
from mpq.sensitivity.loop import LoopOptions, score_layers
from mpq.sensitivity.scorers import Sqnr
from mpq.sensitivity.stage import compute_sensitivity

from _measure import max_diff, measure, peak_mb
from _synthetic import random_denoiser, synthetic_calib


def row(label, device, n_layers, t_naive, t_fast, m_naive, m_fast, diff):
    return (
        f"| {label} | {device.type} | {n_layers} | {t_naive:.2f} | {t_fast:.2f} | {t_naive / t_fast:.2f}x | "
        f"{m_naive:,.0f} | {m_fast:,.0f} | {diff} |"
    )


def tiny_rows(device: torch.device) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "tiny-sdxl", [f"model.device={device.type}", "calib.num_samples=16", "sensitivity.num_images=8"]
        )
        run = RunDir(tmp)
        pipe = load_pipeline(cfg)
        run.save_config(cfg)
        run_calibration(cfg, run, pipe)
        run_ptq(cfg, run, pipe)
        unshared = load_config(
            "tiny-sdxl",
            [
                f"model.device={device.type}",
                "calib.num_samples=16",
                "sensitivity.num_images=8",
                "sensitivity.share_bits=never",
            ],
        )
        for kind, metric in (("weight", "sqnr"), ("act", "sqnr"), ("weight", "ssim"), ("act", "ssim")):
            naive, t_n, m_n = measure(
                device, lambda: compute_sensitivity(cfg, run, kind, metric, "naive", pipe=pipe, show=False, write=False)
            )
            shared = cfg.copy()
            shared.sensitivity.share_bits = "always"
            for c, tag in ((shared, "always"), (unshared, "never")):
                fast, t_f, m_f = measure(
                    device,
                    lambda: compute_sensitivity(c, run, kind, metric, "fast", pipe=pipe, show=False, write=False),
                )
                rows.append(
                    row(
                        f"tiny-sdxl {kind} {metric}, share_bits={tag}",
                        device,
                        len(naive),
                        t_n,
                        t_f,
                        m_n,
                        m_f,
                        max_diff(naive, fast),
                    )
                )
    return rows


def sdxl_row(device: torch.device, n_layers: int, n_samples: int, dtype: str = "bf16") -> str:
    """The library's loop (:func:`mpq.sensitivity.loop.score_layers`) on the full-size SDXL UNet, random weights."""
    cfg = load_config(
        "sdxl-turbo",
        [
            f"model.dtype={dtype}",
            f"sensitivity.dtype={dtype}",
            f"model.device={device.type}",
            "calib.batch_size=1",
            "sensitivity.batch_size=1",
        ],
    )
    arch = load_arch(cfg)
    den = random_denoiser(arch, torch_dtype(dtype), device)
    calib = synthetic_calib(den, arch, cfg.sampling.resolution, n_samples, batch=1)
    qm = QuantModel(den)
    calibrate(qm, calib, cfg, show=False)
    bits = qm.bits
    step = max(1, len(qm.names) // n_layers)
    subset = qm.names[::step][:n_layers]

    def scores(fast: bool, share: bool = True) -> dict[str, list[float]]:
        return score_layers(qm, Sqnr(None, qm, cfg, calib), subset, bits, "weight", LoopOptions(fast, share))

    naive, t_n, m_n = measure(device, lambda: scores(False))
    label = f"SDXL UNet {dtype} weight sqnr, {len(subset)}-layer subset, {n_samples} samples"
    out = []
    for share in (True, False):
        fast, t_f, m_f = measure(device, lambda: scores(True, share))
        out.append(
            row(
                f"{label}, share_bits={'always' if share else 'never'}",
                device,
                len(subset),
                t_n,
                t_f,
                m_n,
                m_f,
                max_diff(naive, fast),
            )
        )
    return "\n".join(out)


def sdxl_forward_row(device: torch.device, dtype: str, repeats: int = 2) -> str:
    """One denoiser forward of the full-size SDXL UNet (batch 1, 64x64 latents): what every sensitivity item costs
    (naive: one per layer x bit x batch), in ``dtype``; run each dtype in its own process for its peak memory."""
    cfg = load_config("sdxl-turbo", [f"model.dtype={dtype}", f"model.device={device.type}"])
    arch = load_arch(cfg)
    den = random_denoiser(arch, torch_dtype(dtype), device)
    calib = synthetic_calib(den, arch, cfg.sampling.resolution, 1, batch=1)
    qm = QuantModel(den)
    kwargs = next(iter(calib.batches(1, device, torch_dtype(dtype))))[0]
    with torch.no_grad():
        best = min(measure(device, lambda: qm(**kwargs, return_dict=False))[1] for _ in range(repeats))
    return f"| SDXL UNet forward, {dtype} | {device.type} | {best:.2f} s | {peak_mb(device):,.0f} MB |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--sdxl-layers", type=int, default=12)
    ap.add_argument("--sdxl-samples", type=int, default=2)
    ap.add_argument(
        "--sdxl-dtypes",
        nargs="+",
        default=["bf16"],
        choices=["fp32", "fp16", "bf16"],
        help="SDXL rows per dtype: fp32 vs bf16 gives the cost of the fp32 sensitivity default (issue: float floor)",
    )
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: disable TF32 matmul/conv (fp32 stays fp32)")
    ap.add_argument(
        "--forward-only",
        metavar="DTYPE",
        choices=["fp32", "fp16", "bf16"],
        help="only time one full-size SDXL UNet forward in DTYPE (and the process's peak memory)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.forward_only:
        print(
            "| case | device | seconds | peak memory |\n|---|---|---|---|\n"
            + sdxl_forward_row(device, args.forward_only)
        )
        return
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(
        "| case | device | layers | naive (s) | fast (s) | speed-up | naive peak MB | fast peak MB | max score diff "
        "per bit (2/4/8) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    if not args.skip_tiny:
        for r in tiny_rows(device):
            print(r, flush=True)
    if not args.skip_sdxl:
        for dtype in args.sdxl_dtypes:
            print(sdxl_row(device, args.sdxl_layers, args.sdxl_samples, dtype), flush=True)


if __name__ == "__main__":
    main()
