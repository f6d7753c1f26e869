"""PTQ: calibrate weight and activation quant params for every candidate bit in one pass.

Weights: per candidate bit, a scale (and offset) per output channel and group
of input columns as ``quant.weight`` sets it (min-max, or an MSE search over
clipping ratios; :class:`~mpq.quant.quantizer.WeightQuant`). Activations: one pass of the
calibration data through the FP denoiser records each layer's running
input range (momentum 0.95, per tensor); every candidate bit's scale and zero
point derive from that one range. So the cost of calibrating three bits is
one forward pass plus three cheap weight-scale computations.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.calibration.checkpoint import save_checkpoint
from mpq.calibration.record import CalibData
from mpq.errors import MpqError
from mpq.families import family_of
from mpq.models import denoiser_of, pipeline_in, torch_dtype
from mpq.quant.formats import resolve
from mpq.quant.model import QuantModel, same_weights, weights_sample
from mpq.quant.quantizer import WeightQuant
from mpq.quant.steps import call_timestep, step_bounds
from mpq.quant.structure import constant_first_token, trace
from mpq.runner.config import weight_formats
from mpq.runner.progress import progress
from mpq.runner.rundir import RunDir


def prepare(qm: QuantModel, calib: CalibData, cfg: DictConfig, bits: list[int] | None = None) -> None:
    """Allocate ``qm``'s quant params for ``bits`` (default: the config's candidates). The structure pass (one FP
    forward on the first calibration sample) finds each layer's input size and the split inputs; the BOS-aware
    layers are the text layers when the recorded text has a constant first token (kept where the config enables
    them): the layer description the checkpoint records."""
    device, dtype = next(qm.denoiser.parameters()).device, next(qm.denoiser.parameters()).dtype
    qm.set_fp()
    first = next(iter(calib.batches(1, device, dtype)))[0]
    text = calib.first_tokens(family_of(qm.denoiser).text_key)
    constant = text is not None and constant_first_token(text)
    st = trace(qm.denoiser, first, constant).enabled(cfg.quant.split_shortcut, cfg.quant.act.bos_aware)
    qm.prepare(
        list(bits if bits is not None else cfg.quant.bits),
        cfg.quant.act.symmetric,
        st,
        WeightQuant.from_config(cfg.quant.weight),
        weight_formats(cfg),
        calib_step_bounds(calib, int(cfg.quant.act.step_groups)),
    )


def calib_step_bounds(calib: CalibData, groups: int) -> list[float]:
    """The timestep boundaries of ``groups`` step groups over the recorded calls ([] for one group)."""
    if groups == 1:
        return []
    if any("timestep" not in step for step in calib.steps):
        raise MpqError("the calibration data records no timestep input, so quant.act.step_groups must be 1")
    return step_bounds((call_timestep(step["timestep"]) for step in calib.steps), groups)


def calibrate(
    qm: QuantModel, calib: CalibData, cfg: DictConfig, bits: list[int] | None = None, show: bool = True
) -> dict[str, float]:
    """Fill ``qm``'s quant params for ``bits`` (default: the config's candidates); returns timings (s)."""
    prepare(qm, calib, cfg, bits)
    bits = qm.bits
    aq = cfg.quant.act
    device = next(qm.denoiser.parameters()).device
    dtype = next(qm.denoiser.parameters()).dtype
    t0 = time.perf_counter()
    for layer in progress(
        qm.layers.values(), desc=f"ptq: weight scales {qm.weight_keys}", unit="layer", disable=not show, leave=False
    ):
        layer.calibrate_weight()
    t1 = time.perf_counter()
    bs = cfg.calib.batch_size
    style = aq.calibration
    batches = calib.batches(bs, device, dtype)
    if style == "mixdq":  # MixDQ's loop: shuffled batches, W8A8 on, one range update per candidate bit
        batches = list(batches)
        batches = [
            batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
        ]
    repeats, qbits = (len(bits), 8 if 8 in bits else max(bits)) if style == "mixdq" else (1, None)
    with qm.observing(aq.momentum, repeats, qbits), torch.no_grad():
        for kwargs, _ in progress(
            batches,
            total=calib.num_batches(bs),
            desc="ptq: activation ranges",
            unit="batch",
            disable=not show,
            leave=False,
        ):
            qm(**kwargs, return_dict=False)
    missing = [n for n, layer in qm.layers.items() if not layer.a_observed]
    unseen = [
        f"{n}, step group {g}"
        for n, layer in qm.layers.items()
        for g in range(layer.step_groups if layer.step_groups > 1 else 0)
        if g not in layer.a_step_observed
    ]
    if unseen and not missing:
        raise MpqError(
            f"{len(unseen)} layer x step group pairs never ran (first: {unseen[0]}): a layer that runs at some steps "
            "only; lower quant.act.step_groups (1: one range for all steps)"
        )
    if missing:
        raise MpqError(
            f"{len(missing)} layers never ran on the calibration data (first: {missing[0]}); check the calibration "
            "data matches the model"
        )
    for layer in qm.layers.values():
        layer.finalize_act()
    t2 = time.perf_counter()
    return {"weight_s": t1 - t0, "act_s": t2 - t1, "total_s": t2 - t0}


def run_ptq(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    calib = CalibData.open(run)
    pipe = pipeline_in(cfg, torch_dtype(cfg.sensitivity.dtype), pipe)  # statistics in the sensitivity dtype (fp32)
    qm = QuantModel(denoiser_of(pipe))
    if calib.meta.get("fingerprint") != qm.fingerprint or not same_weights(
        calib.meta.get("weights_sample"), weights_sample(qm.denoiser)
    ):
        raise MpqError(
            f"{run.calib} was recorded with another model ({calib.meta.get('model_id')}); "
            f"re-run `mpq calib --force` for {cfg.model.id}"
        )
    free = [f for f in weight_formats(cfg) if resolve(f).data_free]
    if free:
        print(f"[ptq] {', '.join(free)}: nothing to calibrate (quantized from the weight alone, when a plan uses them)")
    timings = calibrate(qm, calib, cfg)
    manifest = save_checkpoint(run.ckpt, qm, cfg)
    return {"timings": timings, "layers": len(manifest["layers"]), "bits": manifest["bits"]}
