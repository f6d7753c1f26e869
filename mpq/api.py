"""The Python API: one verb to quantize a model with a plan, in the torchao style.

    import mpq
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("stabilityai/sdxl-turbo")
    plan = mpq.BitPlan.load("weight_4.00_1.00.yaml", "act_7.77_1.00.yaml", "act_protect.pt")  # MixDQ's files
    qm = mpq.quantize_(pipe, plan, "outputs/sdxl-turbo/ckpt.safetensors")
    image = pipe("a red fox in the snow", num_inference_steps=1, guidance_scale=0.0).images[0]
    qm.apply(mpq.BitPlan.uniform(qm.names, 8, 8))  # switch plans without reloading
    qm.apply(mpq.BitPlan.uniform(qm.names, "nf12", None))  # a weight format the checkpoint calibrated

The denoiser's Linear/Conv2d layers are replaced in place by quantized twins
whose quant params are registered buffers: the model keeps working with
``.to()``, ``.half()``, ``state_dict()``, hooks and CPU offload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mpq.calibration.checkpoint import load_checkpoint
from mpq.models import denoiser_of
from mpq.plan import BitPlan
from mpq.quant.model import QuantModel

# the handle ``quantize_`` returns: ``.apply(plan)``, ``.set_fp()``, ``.names``, ``.bits``, ``.layers``
QuantizedModel = QuantModel


def quantize_(model: Any, plan: BitPlan, ckpt: str | Path) -> QuantModel:
    """Quantize ``model`` (a diffusers pipeline, or its denoiser) in place with ``plan``, using the quant params of
    an mpq PTQ checkpoint; returns the handle that switches plans (``.apply(plan)``, ``.set_fp()``)."""
    qm = QuantModel(model if isinstance(model, nn.Module) else denoiser_of(model))
    load_checkpoint(ckpt, qm)
    qm.apply(plan)
    return qm
