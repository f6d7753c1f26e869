"""Estimated cost of scoring each layer (relative units), for sharding the sensitivity stage over ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mpq.calibration.record import CalibData
from mpq.quant.model import QuantModel


def execution_macs(qm: QuantModel, kwargs: dict[str, Any]) -> dict[str, float]:
    """Multiply-accumulates of each quantizable layer in one denoiser call on ``kwargs``, in the order the
    layers first run."""
    macs: dict[str, float] = {}

    def count(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            macs.setdefault(name, float(out.numel() * module.weight[0].numel()))

        return hook

    hooks = [layer.register_forward_hook(count(name)) for name, layer in qm.layers.items()]
    try:
        with torch.no_grad():
            qm(**kwargs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_costs(
    qm: QuantModel, calib: CalibData, names: list[str], metric: str, fast: bool, n_bits: int
) -> dict[str, float]:
    """With the prefix cache, the network after the layer (its multiply-accumulates, in execution order) runs for
    each bit; naive, all of it; SSIM adds the rest of the pipeline (taken as one more denoiser's worth: VAE decode,
    SSIM)."""
    device = next(qm.denoiser.parameters()).device
    dtype = next(qm.denoiser.parameters()).dtype
    kwargs = next(iter(calib.batches(1, device, dtype)))[0]
    macs = execution_macs(qm, kwargs)
    total = sum(macs.values())
    suffix, left = {}, total
    for name, m in macs.items():
        suffix[name] = left
        left -= m
    extra = total if metric == "ssim" else 0.0
    return {n: n_bits * ((suffix.get(n, total) if fast else total) + extra) for n in names}
