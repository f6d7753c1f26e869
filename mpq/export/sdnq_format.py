"""``mpq export --format sdnq``: a plan of SDNQ dtypes as an SDNQ pre-quantized diffusers pipeline folder.

The folder needs no mpq: with the ``sdnq`` package installed, stock diffusers loads it
(``DiffusionPipeline.from_pretrained(folder)``: diffusers has SDNQ's quantizer built in) and it runs on SDNQ's
kernels wherever SDNQ runs. It is written by SDNQ itself: the run's FP denoiser is quantized by
``sdnq_post_load_quant`` with the plan as its per-module config (``modules_quant_config``: each planned layer's
dtype and group size; every other weight in ``modules_to_not_convert``; SDNQ's own size limits and skip keys off, so
it converts exactly the planned layers) and the pipeline is saved by ``sdnq.loader.save_sdnq_model``.

The planned layers are quantized from the float32 weights mpq's simulation uses (so their codes are the simulated
ones); the rest of the pipeline, and SDNQ's dequantized compute dtype, are ``fp_dtype``. Activation bits of the plan
are not exported: SDNQ computes activations in the compute dtype (its optional quantized INT8/FP8 matmul quantizes
them dynamically, per token, which is not mpq's calibrated static ranges).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.export.runtime import cast_others, runtime_plan
from mpq.models import denoiser_name, denoiser_of
from mpq.plan import BitPlan
from mpq.quant.formats import Key
from mpq.quant.formats.sdnq import INSTALL, SdnqFormat, sdnq_module


def sdnq_plan(plan: Mapping[str, Key]) -> dict[str, SdnqFormat]:
    """{module path: format} of a weight plan (layer names as mpq writes them); a one-line error for a planned
    format SDNQ does not store. (A layer whose shape its dtype cannot hold stays FP: see :func:`quantize_denoiser`.)"""
    return runtime_plan(plan, SdnqFormat, "SDNQ", "sdnq", "sdnq-<dtype>")


def sdnq_kwargs(denoiser: nn.Module, layers: Mapping[str, SdnqFormat]) -> dict[str, Any]:
    """``sdnq_post_load_quant``'s arguments to convert exactly ``layers`` (each at its dtype and group size), every
    other weight left as it is, SDNQ's own size limits and skip keys off (pure)."""
    weights = [f"{path}.weight" for path, m in denoiser.named_modules() if getattr(m, "weight", None) is not None]
    planned = {f"{path}.weight": fmt.sdnq_config() for path, fmt in layers.items()}
    return {
        "quant_conv": True,
        "add_skip_keys": False,
        "minimum_allowed_numel": 0,
        "minimum_allowed_channel_size": 0,
        "modules_quant_config": planned,
        "modules_to_not_convert": [w for w in weights if w not in planned],
    }


def quantize_denoiser(
    denoiser: nn.Module, layers: Mapping[str, SdnqFormat], fp_dtype: torch.dtype
) -> tuple[nn.Module, list[str]]:
    """``denoiser`` (float32, plain torch layers) quantized by SDNQ as planned, everything else in ``fp_dtype``; and
    the planned layers SDNQ cannot hold in their dtype at their shape (they stay FP, as simulated and priced)."""
    q = sdnq_module()
    weights = {path: denoiser.get_submodule(path).weight.detach().float() for path in layers}
    convert = {path: fmt for path, fmt in layers.items() if fmt.stores(tuple(weights[path].shape))}
    denoiser.to(fp_dtype)
    for path in convert:  # SDNQ quantizes the float32 weights the simulation quantized
        denoiser.get_submodule(path).weight = nn.Parameter(weights[path], requires_grad=False)
    quantized = q.sdnq_post_load_quant(denoiser, torch_dtype=fp_dtype, **sdnq_kwargs(denoiser, convert))
    return quantized, [path for path in layers if path not in convert]


def sdnq_tensor_bytes(module: nn.Module) -> int:
    """Bytes of the tensors SDNQ keeps for one of its quantized layers (its own list of them: what it saves)."""
    from sdnq.common import sdnq_keys

    tensors = [getattr(module, key, None) for key in sorted(sdnq_keys)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def stored_layer_bytes(denoiser: nn.Module, layers: Mapping[str, SdnqFormat]) -> int:
    """Bytes of the tensors SDNQ keeps for the planned layers it converted."""
    modules = [denoiser.get_submodule(path) for path in layers]
    return sum(sdnq_tensor_bytes(m) for m in modules if getattr(m, "sdnq_dequantizer", None) is not None)


def export_sdnq(cfg: Any, plan: BitPlan, folder: Path, fp_dtype: torch.dtype) -> dict[str, Any]:
    """Write the SDNQ pipeline folder of ``plan`` into ``folder`` (made and moved into place by
    :func:`mpq.export.folder.export_folder`)."""
    from mpq.models import load_pipeline
    from mpq.models.loader import absent_components

    layers = sdnq_plan(plan.weight)
    sdnq_module()  # one line naming the install command when it is missing
    try:
        from sdnq.loader import save_sdnq_model
    except ImportError as err:
        raise MpqError(
            f"the installed sdnq has no save_sdnq_model ({err}); install the pinned one with {INSTALL}"
        ) from None
    pipe = load_pipeline(cfg, dtype=torch.float32)
    component = denoiser_name(pipe.components)
    den, kept_fp = quantize_denoiser(denoiser_of(pipe), layers, fp_dtype)
    setattr(pipe, component, den)
    cast_others(pipe, component, fp_dtype)
    save_sdnq_model(pipe, str(folder), is_pipeline=True)
    return {
        "denoiser_bytes": sum(p.stat().st_size for p in (folder / component).glob("*.safetensors")),
        "layers": len(layers) - len(kept_fp),
        "kept_fp": kept_fp,
        "layer_bytes": stored_layer_bytes(den, layers),
        "act_dropped": len(plan.act),
        "absent": sorted(absent_components(str(folder))),
        "component": component,
    }
