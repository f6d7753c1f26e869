"""mpq's activation calibration vs MixDQ's loop, side by side on one run's calibration data.

mpq: the FP model, batches in order, one running-range update per batch. MixDQ: batches shuffled,
W8A8 on while observing (with the ranges so far), the range updated once per candidate bit (3x).
For each, the denoiser-output SQNR against FP over the calibration set at uniform bits, and the
image MSE vs FP (first ``--images`` calibration prompts) at W8A8 and W4A8.

    python benchmarks/bench_act_calibration.py --run outputs/tiny-sdxl [calib.batch_size=4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mpq.calibration.ptq import calibrate
from mpq.calibration.record import CalibData
from mpq.images import generate, to_array
from mpq.metrics import SqnrAccumulator, image_mse
from mpq.models import denoiser_of, load_pipeline
from mpq.plan import BitPlan
from mpq.prompts import cycle, read_prompts
from mpq.quant.model import QuantModel
from mpq.runner.rundir import RunDir

PLANS = ((8, 8), (4, 8), (None, 8), (None, 4), (8, 4))


def sqnr_of(qm: QuantModel, calib: CalibData, refs: list[torch.Tensor], bs: int) -> float:
    acc = SqnrAccumulator()
    with torch.no_grad():
        for (kwargs, _), ref in zip(calib.batches(bs, torch.device("cpu")), refs):
            acc.update(qm(**kwargs, return_dict=False)[0], ref)
    return acc.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with calibration data (mpq calib)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. calib.batch_size=4 (MixDQ: several shuffled batches)"
    )
    args = ap.parse_args()
    run = RunDir(args.run)
    cfg = run.load_config(None, ["model.device=cpu", *args.overrides])
    pipe = load_pipeline(cfg)
    qm = QuantModel(denoiser_of(pipe))
    calib = CalibData.open(run)
    bs = cfg.calib.batch_size
    with torch.no_grad():
        refs = [qm(**kw, return_dict=False)[0] for kw, _ in calib.batches(bs, torch.device("cpu"))]
    prompts, seeds = cycle(read_prompts(cfg.calib.prompts_file), args.images, cfg.sampling.seed)
    fp_images = to_array(generate(pipe, prompts, seeds, cfg))
    rows = []
    for style in ("mpq", "mixdq"):
        cfg.quant.act.calibration = style
        t0 = time.perf_counter()
        calibrate(qm, calib, cfg, show=False)
        seconds = time.perf_counter() - t0
        cells = []
        for w, a in PLANS:
            qm.apply(BitPlan.uniform(qm.names, w, a))
            cells.append(f"{sqnr_of(qm, calib, refs, bs):.2f}")
        for w, a in ((8, 8), (4, 8)):
            qm.apply(BitPlan.uniform(qm.names, w, a))
            cells.append(f"{float(np.mean(image_mse(to_array(generate(pipe, prompts, seeds, cfg)), fp_images))):.3g}")
        qm.set_fp()
        rows.append(f"| {style} | {seconds:.1f} | " + " | ".join(cells) + " |")
    heads = [f"W{w or 'FP'}A{a} SQNR (dB)" for w, a in PLANS] + ["W8A8 image MSE", "W4A8 image MSE"]
    print(f"{run.root} ({cfg.model.id}), {calib.num_batches(bs)} calibration batches of {bs}; {args.images} images\n")
    print("| calibration | seconds | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 2) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
