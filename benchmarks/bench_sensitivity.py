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
from _measure import max_diff, measure

from mpq.calib import run_calibration
from mpq.config import load_config
from mpq.metrics import sqnr_db
from mpq.models import load_arch, load_pipeline
from mpq.prefix_cache import PrefixCache
from mpq.ptq import calibrate, run_ptq
from mpq.quant.model import PREFIX, QuantModel
from mpq.rundir import RunDir
from mpq.sensitivity import compute_sensitivity
from mpq.synthetic import random_denoiser, synthetic_calib


def row(label, device, n_layers, t_naive, t_fast, m_naive, m_fast, diff):
    return (f"| {label} | {device.type} | {n_layers} | {t_naive:.2f} | {t_fast:.2f} | {t_naive / t_fast:.2f}x | "
            f"{m_naive:,.0f} | {m_fast:,.0f} | {diff:.2e} |")


def tiny_rows(device: torch.device) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("tiny-sdxl", [f"model.device={device.type}", "calib.num_samples=16", "sensitivity.num_images=8"])
        run = RunDir(tmp)
        pipe = load_pipeline(cfg)
        run.save_config(cfg)
        run_calibration(cfg, run, pipe)
        run_ptq(cfg, run, pipe)
        for kind, metric in (("weight", "sqnr"), ("act", "sqnr"), ("weight", "ssim"), ("act", "ssim")):
            naive, t_n, m_n = measure(device, lambda: compute_sensitivity(cfg, run, kind, metric, "naive", pipe=pipe, progress=False, write=False))
            fast, t_f, m_f = measure(device, lambda: compute_sensitivity(cfg, run, kind, metric, "fast", pipe=pipe, progress=False, write=False))
            rows.append(row(f"tiny-sdxl {kind} {metric}", device, len(naive), t_n, t_f, m_n, m_f, max_diff(naive, fast)))
    return rows


def sdxl_row(device: torch.device, n_layers: int, n_samples: int) -> str:
    cfg = load_config("sdxl-turbo", ["model.dtype=bf16", f"model.device={device.type}", "calib.batch_size=1"])
    arch = load_arch(cfg)
    den = random_denoiser(arch, torch.bfloat16, device)
    calib = synthetic_calib(den, arch, cfg.sampling.resolution, n_samples, batch=1)
    qm = QuantModel(den)
    calibrate(qm, calib, cfg, bits=list(cfg.quant.bits), progress=False)
    names = qm.names
    step = max(1, len(names) // n_layers)
    subset = names[::step][:n_layers]
    batches = list(calib.batches(1, device))
    bits = list(cfg.quant.bits)

    def scores(fast: bool) -> dict[str, list[float]]:
        cache = PrefixCache(den) if fast else None
        out = {}
        try:
            if cache:
                cache.record()
                with torch.no_grad():
                    for kwargs, _ in batches:
                        qm(**kwargs, return_dict=False)
                cache.off()
            for name in subset:
                vals = []
                for b in bits:
                    qm.layers[name].set_bits(b, None)
                    if cache:
                        cache.replay(name[len(PREFIX):])
                    ref_sq = err_sq = 0.0
                    with torch.no_grad():
                        for kwargs, ref in batches:
                            o = qm(**kwargs, return_dict=False)[0].double()
                            r = ref.to(o.device).double()
                            ref_sq += float(r.pow(2).sum())
                            err_sq += float((o - r).pow(2).sum())
                    if cache:
                        cache.off()
                    vals.append(sqnr_db(ref_sq, err_sq))
                qm.layers[name].set_bits(None, None)
                out[name] = vals
        finally:
            if cache:
                cache.close()
        return out

    naive, t_n, m_n = measure(device, lambda: scores(False))
    fast, t_f, m_f = measure(device, lambda: scores(True))
    return row(f"SDXL UNet bf16 weight sqnr, {len(subset)}-layer subset, {n_samples} samples", device, len(subset),
               t_n, t_f, m_n, m_f, max_diff(naive, fast))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--sdxl-layers", type=int, default=12)
    ap.add_argument("--sdxl-samples", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    print("| case | device | layers | naive (s) | fast (s) | speed-up | naive peak MB | fast peak MB | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    if not args.skip_tiny:
        for r in tiny_rows(device):
            print(r, flush=True)
    if not args.skip_sdxl:
        print(sdxl_row(device, args.sdxl_layers, args.sdxl_samples), flush=True)


if __name__ == "__main__":
    main()
