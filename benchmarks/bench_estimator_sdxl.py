"""The Fisher estimator's cost on the full-size SDXL UNet architecture (random weights, fp32, 64x64 latents, one
sample), and a projection of a whole SDXL-Turbo sensitivity with it.

    python benchmarks/bench_estimator_sdxl.py [--device cpu] [--score-layers 48] [--forward-s 1.5]

Measured: one plain forward; one forward + backward of a denoising loss with every layer's output gradient kept
(the estimator's hooks); each candidate bit's quantized output of a layer subset spread over the network (weights),
against those layers' own FP time in the forward, extrapolated to every layer by that ratio. The denoising loss
uses random latents as x0 (the VAE encoding of the FP images is done once per image and is not counted). The
projection scales every measured time by (--forward-s) / (this device's forward): MixDQ's SDXL-Turbo setting, 32
samples, 1 step, 3 bits, weights and activations (the SSIM files read the same estimate).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mpq.commands.main import _quiet_libraries
from mpq.layers import CONTENT, assign_groups
from mpq.models import load_arch
from mpq.quant.model import QuantModel
from mpq.quant.quantizer import WeightQuant
from mpq.runner.config import load_config
from mpq.sensitivity.estimators import fisher_batch

from _measure import peak_mb, sync
from _synthetic import random_denoiser, synthetic_calib


class RandomObjective:
    """The denoising loss's cost without a VAE: random x0 and noise at alpha_bar = 0.5, epsilon target."""

    def inputs(self, kwargs: dict[str, Any], images: list[int], batch: int) -> tuple[dict[str, Any], Any, Any]:
        s = kwargs["sample"]
        g = torch.Generator("cpu").manual_seed(batch)
        x0, noise = torch.randn(s.shape, generator=g), torch.randn(s.shape, generator=g)
        noisy = (0.5**0.5 * x0 + 0.5**0.5 * noise).to(s.device, s.dtype)
        return {**kwargs, "sample": noisy}, noise.to(s.device), s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--score-layers", type=int, default=48, help="layers scored for the per-bit cost (spread)")
    ap.add_argument("--forward-s", type=float, default=1.5, help="one SDXL UNet forward on the target GPU (s)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--hybrid-fraction", type=float, default=0.3, help="hybrid: layers recomputed exactly (SQNR)")
    args = ap.parse_args()
    _quiet_libraries()
    device = torch.device(args.device)
    cfg = load_config("sdxl-turbo", ["model.device=" + args.device])
    arch = load_arch(cfg)
    unet = random_denoiser(arch, torch.float32, device)
    calib = synthetic_calib(unet, arch, 512, 1)
    kwargs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in calib.batches(1, device).__next__()[0].items()
    }
    qm = QuantModel(unet)
    names = qm.names
    step = max(1, len(names) // args.score_layers)
    subset = names[::step][: args.score_layers]
    qm.prepare([2, 4, 8], False, wq=WeightQuant())
    for n in subset:
        qm.layers[n].calibrate_weight()
    qm.set_fp()

    # per-layer FP time in the forward (hooks: a layer's own op)
    own: dict[str, float] = {}
    starts: dict[str, float] = {}
    starts_first: dict[str, float] = {}
    first = [
        qm.layers[n].register_forward_pre_hook(
            lambda m, a, n=n: starts_first.setdefault(n, time.perf_counter()) and None
        )
        for n in names
    ]
    pre = [
        qm.layers[n].register_forward_pre_hook(lambda m, a, n=n: starts.__setitem__(n, time.perf_counter()))
        for n in names
    ]
    post = [
        qm.layers[n].register_forward_hook(lambda m, a, o, n=n: own.__setitem__(n, time.perf_counter() - starts[n]))
        for n in names
    ]
    with torch.no_grad():
        qm(**kwargs, return_dict=False)  # warm-up
        sync(device)
        starts_first.clear()
        t0 = t_first = time.perf_counter()
        qm(**kwargs, return_dict=False)
        sync(device)
        t_fwd = time.perf_counter() - t0
    for h in pre + post + first:
        h.remove()
    layer_share = sum(own.values()) / t_fwd
    print(f"SDXL UNet, {len(names)} layers, fp32 {device.type}, 64x64 latents, 1 sample")
    print(f"  one forward: {t_fwd:.1f} s ({layer_share:.0%} of it in the Linear/Conv2d layers' own ops)")

    objective = RandomObjective()
    sync(device)
    t0 = time.perf_counter()
    fisher_batch(qm, objective, kwargs, [0], 0, names, "weight", [])  # forward + backward, every gradient kept
    sync(device)
    t_fb = time.perf_counter() - t0
    print(
        f"  forward + backward, every layer's output gradient kept: {t_fb:.1f} s ({t_fb / t_fwd:.2f} forwards); "
        f"peak {peak_mb(device):,.0f} MB"
    )

    sync(device)
    t0 = time.perf_counter()
    fisher_batch(qm, objective, kwargs, [0], 1, subset, "weight", [2, 4, 8])
    sync(device)
    t_sub = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    fisher_batch(qm, objective, kwargs, [0], 1, subset, "weight", [])
    sync(device)
    t_sub_fb = time.perf_counter() - t0
    scoring = max(0.0, t_sub - t_sub_fb)
    ratio = scoring / max(1e-9, sum(own[n] for n in subset))
    t_score_all = ratio * sum(own.values())
    per_sample = t_fb + t_score_all
    print(
        f"  scoring 3 bits on {len(subset)} layers: {scoring:.1f} s = {ratio:.1f}x their FP op time; every layer "
        f"extrapolated: {t_score_all:.1f} s ({t_score_all / t_fwd:.2f} forwards)"
    )
    print(f"  per sample and kind: {per_sample:.1f} s = {per_sample / t_fwd:.2f} forwards")
    total_fwds = per_sample / t_fwd * args.samples * 2  # weights and activations
    gpu = total_fwds * args.forward_s
    print(
        f"projection, SDXL-Turbo ({args.samples} samples x 1 step x weights+acts, 3 bits, fisher for all four files): "
        f"{total_fwds:.0f} forward-equivalents = {total_fwds * t_fwd / 3600:.2f} h on this {device.type}; "
        f"{gpu / 60:.1f} min at {args.forward_s} s a forward"
    )
    # the exact fast path's items, as benchmarks/bench_distributed.py prices them: the forward after the layer
    # starts, per bit and sample (SQNR) or image (SSIM, the denoiser only)
    rest = {n: t_fwd - (starts_first[n] - t_first) for n in names}
    groups = assign_groups(names, list(cfg.groups.content), warn=False)
    content = [n for n in names if groups[n] == CONTENT]
    images = cfg.sensitivity.num_images
    sqnr_fwds = 2 * 3 * args.samples * sum(rest.values()) / t_fwd
    ssim_fwds = 2 * 3 * images * sum(rest[n] for n in content) / t_fwd
    f = args.hybrid_fraction
    hybrid = total_fwds + ssim_fwds + f * sqnr_fwds
    for label, fwds in (
        ("exact fast path", sqnr_fwds + ssim_fwds),
        (f"hybrid (fisher; exact SSIM of {len(content)} content layers; exact SQNR for {f:.0%} of layers)", hybrid),
    ):
        print(
            f"  {label}: {fwds:,.0f} forward-equivalents = {fwds * args.forward_s / 3600:.1f} h at {args.forward_s} s"
        )


if __name__ == "__main__":
    main()
