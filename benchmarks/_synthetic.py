"""Random-weight denoisers and synthetic calibration data, for benchmarks at real sizes.

Lets the SDXL-size benchmarks run where no weights can be downloaded: the
architecture comes from the shipped config, the weights from a fixed seed.
"""

from __future__ import annotations

from typing import Any

import torch

from mpq.calibration.record import OUTPUT_KEY, CalibData
from mpq.models.loader import meta_inputs


def random_denoiser(
    arch: dict[str, Any], dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> torch.nn.Module:
    """The architecture with random weights (default init from ``seed``), in ``dtype`` on ``device``."""
    from diffusers import UNet2DConditionModel

    from mpq.models.loader import quiet_loading

    quiet_loading()
    config = {k: v for k, v in arch["denoiser"].items() if not k.startswith("_")}
    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(config)
    finally:
        torch.set_default_dtype(old)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def synthetic_calib(
    denoiser: torch.nn.Module, arch: dict[str, Any], resolution: int, n: int, seed: int = 0, batch: int = 1
) -> CalibData:
    """``n`` random denoiser inputs (one step) and the denoiser's FP outputs on them."""
    param = next(denoiser.parameters())
    g = torch.Generator("cpu").manual_seed(seed)
    shapes = meta_inputs(arch, resolution, None, batch=n)  # shapes only (meta device)
    flat: dict[str, torch.Tensor] = {
        "sample": torch.randn(shapes["sample"].shape, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"].shape, generator=g),
    }
    if "added_cond_kwargs" in shapes:
        flat["added_cond_kwargs.text_embeds"] = torch.randn(
            shapes["added_cond_kwargs"]["text_embeds"].shape, generator=g
        )
        flat["added_cond_kwargs.time_ids"] = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32
        )
    flat = {k: v.to(param.dtype) if v.is_floating_point() else v for k, v in flat.items()}
    data = CalibData([flat], {"num_samples": n, "steps": 1})
    outs = [out for out in _forward_all(denoiser, data, batch, param.device)]
    flat[OUTPUT_KEY] = torch.cat(outs).cpu()
    return CalibData([flat], {"num_samples": n, "steps": 1})


def _forward_all(denoiser: torch.nn.Module, data: CalibData, batch: int, device: torch.device) -> Any:
    from mpq.calibration.record import unflatten

    step = data.steps[0]
    with torch.no_grad():
        for i in range(0, step["sample"].shape[0], batch):
            kwargs = unflatten({k: v[i : i + batch].to(device) for k, v in step.items()})
            yield denoiser(**kwargs, return_dict=False)[0]
