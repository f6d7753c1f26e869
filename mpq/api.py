"""The Python API: one verb to quantize a model with a plan, in the torchao style.

    import mpq
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("stabilityai/sdxl-turbo")
    plan = mpq.BitPlan.load("weight_4.00_1.00.yaml", "act_7.77_1.00.yaml", "act_protect.pt")  # MixDQ's files
    qm = mpq.quantize_(pipe, plan, "outputs/sdxl-turbo/ckpt.safetensors")
    image = pipe("a red fox in the snow", num_inference_steps=1, guidance_scale=0.0).images[0]
    qm.apply(mpq.BitPlan.uniform(qm.names, 8, 8))  # switch plans without reloading

The denoiser's Linear/Conv2d layers are replaced in place by quantized twins
whose quant params are registered buffers: the model keeps working with
``.to()``, ``.half()``, ``state_dict()``, hooks and CPU offload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mpq.ckpt import load_checkpoint
from mpq.errors import MpqError
from mpq.plan import BitPlan
from mpq.quant.model import QuantModel


def _denoiser(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    for name in ("unet", "transformer"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise MpqError(f"{type(model).__name__} is neither a torch module nor a pipeline with a unet or transformer")


class QuantizedModel(QuantModel):
    """A :class:`~mpq.quant.model.QuantModel` whose ``apply`` takes a :class:`~mpq.plan.BitPlan`."""

    def apply(self, plan: BitPlan | None = None, act: Any = None) -> None:  # type: ignore[override]
        if isinstance(plan, BitPlan):
            plan.validate(self.names, self.bits)
            return super().apply(plan.weight, plan.act)
        return super().apply(plan, act)


def quantize_(model: Any, plan: BitPlan, ckpt: str | Path) -> QuantizedModel:
    """Quantize ``model`` (a diffusers pipeline, or its denoiser) in place with ``plan``, using the quant params of
    an mpq PTQ checkpoint; returns the handle that switches plans (``.apply(plan)``, ``.set_fp()``)."""
    qm = QuantizedModel(_denoiser(model))
    load_checkpoint(ckpt, qm)
    qm.apply(plan)
    return qm
