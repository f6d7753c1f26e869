"""The two sensitivity metrics as scorers over their batches: SQNR of the denoiser output, SSIM of images.

A scorer's ``run_fp(k)`` runs batch k in FP (recorded by the prefix cache in
fast mode) and keeps its output as the reference; ``scores(k, tile)`` gives the
float64 sums (a, b) of batch k for each of ``tile`` bit copies run together;
``value(a, b)`` is the metric. The reference is the FP pass of this same
pipeline, in ``sensitivity.dtype``, on the same batches: scores depend on the
calibration inputs and that model alone, not on the dtype the run generates in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils._pytree import tree_map

from mpq.calibration.record import CalibData, calib_prompts
from mpq.families import family_of
from mpq.images import PromptEmbeddings, generators, to_array
from mpq.layers import CONTENT
from mpq.metrics import SqnrAccumulator, image_ssim, sqnr_db
from mpq.quant.model import QuantModel
from mpq.runner.choices import METRICS
from mpq.runner.rundir import RunDir
from mpq.sensitivity.prefix_cache import repeat_batch


class Scorer:
    """One sensitivity metric over its batches."""

    name = ""
    group: str | None = None  # the layers it scores (None: every layer)

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig) -> None:
        self.pipe, self.qm, self.cfg = pipe, qm, cfg
        self.device = next(qm.denoiser.parameters()).device
        self.refs: dict[int, Any] = {}
        self.batches: list[Any] = []

    def run_fp(self, k: int) -> None:
        raise NotImplementedError

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        raise NotImplementedError

    @staticmethod
    def value(a: float, b: float) -> float:
        raise NotImplementedError


class Sqnr(Scorer):
    """SQNR (dB) of the denoiser output over the calibration set: sums of ref^2 and err^2."""

    name = "sqnr"

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig, calib: CalibData) -> None:
        super().__init__(pipe, qm, cfg)
        dtype = next(qm.denoiser.parameters()).dtype
        # batches stay on the CPU and move per pass: many steps x guidance halves x prompts need not fit the device
        pairs = list(calib.batches(cfg.sensitivity.batch_size, torch.device("cpu"), dtype))
        self.batches = [kwargs for kwargs, _ in pairs]
        self.recorded = [out for _, out in pairs]  # the calibration run's outputs, in its dtype (the float floor)

    def inputs(self, k: int, tile: int = 1) -> Any:
        """Batch ``k``'s denoiser kwargs on the model's device (``tile`` copies along the batch)."""
        on_device = tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, self.batches[k])
        return repeat_batch(on_device, tile)

    def run_fp(self, k: int) -> None:
        with torch.no_grad():
            self.refs[k] = self.qm(**self.inputs(k), return_dict=False)[0]

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        with torch.no_grad():
            out = self.qm(**self.inputs(k, tile), return_dict=False)[0]
        r = self.refs[k].double()
        return [(float(r.pow(2).sum()), float((o.double() - r).pow(2).sum())) for o in out.chunk(tile)]

    @staticmethod
    def value(a: float, b: float) -> float:
        return sqnr_db(a, b)

    def float_floor_db(self) -> float:
        """SQNR (dB) of the calibration run's FP output (its dtype) against this pass's FP output."""
        acc = SqnrAccumulator()
        for k, rec in enumerate(self.recorded):
            acc.update(rec.to(self.refs[k].device), self.refs[k])
        return acc.value


class Ssim(Scorer):
    """SSIM (``sensitivity.ssim``) of generated images against FP images of the same prompts and seeds."""

    name = "ssim"
    group = CONTENT

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig, run: RunDir, cache_text: bool) -> None:
        super().__init__(pipe, qm, cfg)
        prompts, seeds = calib_prompts(run, cfg.sensitivity.num_images, "sensitivity.num_images")
        n = len(prompts)
        bs = cfg.sampling.batch_size
        self.batches = [(prompts[i : i + bs], seeds[i : i + bs]) for i in range(0, n, bs)]
        self.family = family_of(qm.denoiser)
        self.text = PromptEmbeddings(pipe, cfg) if cache_text else None

    def _generate(self, k: int, tile: int = 1) -> np.ndarray:
        """Images of batch ``k``; ``tile`` > 1 generates the batch ``tile`` times in one pipeline call."""
        prompts, seeds = self.batches[k]
        c = self.cfg.sampling
        kwargs: dict[str, Any] = {
            "num_inference_steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "height": c.resolution,
            "width": c.resolution,
            "generator": generators(list(seeds) * tile),
            "output_type": "pil",
            **self.family.call_kwargs(self.pipe, c.max_sequence_length),
        }
        if self.text is not None and self.text.enabled:  # encoded once (the text encoders are not quantized)
            kwargs.update({key: repeat_batch(t, tile) for key, t in self.text.kwargs(prompts).items()})
        else:
            kwargs["prompt"] = list(prompts) * tile
        with torch.no_grad():
            return to_array(self.pipe(**kwargs).images)

    def run_fp(self, k: int) -> None:
        self.refs[k] = self._generate(k)

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        ref = self.refs[k]
        images = self._generate(k, tile)
        res = []
        for j in range(tile):
            vals = image_ssim(images[j * len(ref) : (j + 1) * len(ref)], ref, self.cfg.sensitivity.ssim)
            res.append((float(vals.astype(np.float64).sum()), float(len(vals))))
        return res

    @staticmethod
    def value(a: float, b: float) -> float:
        return a / b


SCORERS: dict[str, type[Scorer]] = {m.name: m for m in (Sqnr, Ssim)}
assert tuple(SCORERS) == METRICS


def make_scorer(metric: str, pipe: Any, qm: QuantModel, cfg: DictConfig, run: RunDir, fast: bool) -> Scorer:
    if metric == "sqnr":
        return Sqnr(pipe, qm, cfg, CalibData.open(run))
    return Ssim(pipe, qm, cfg, run, cache_text=fast)
