"""Cheap sensitivity estimators: every layer x candidate bit from one recorded pass per calibration batch, instead
of one denoiser run per layer x bit (the exact methods).

* ``local``: each layer's own output SQNR (dB) under its quantization, on the FP input it receives in the FP run
  of the calibration batches; no backward. A rank-preserving score on a dB scale, not the denoiser-output SQNR.
* ``fisher``: the Taylor/Fisher score of NVIDIA Model Optimizer's ``auto_quantize``: ``sum(g^2 * (Y_q - Y)^2)``
  over a layer's output elements, ``g`` the gradient of the model's own denoising loss at the layer output. The
  gradient of "match the FP output" is zero at the FP model, so the loss is the training objective: the FP images'
  latents (the VAE's, normalized as the pipeline's decode expects) noised at the recorded timesteps with fresh
  seeded noise, the target by the scheduler's prediction type (epsilon, v, sample; flow matching: noise - x0), the
  recorded text conditioning. Written as ``10 log10(L / S)``: dB of the estimated loss increase ``S`` below the FP
  loss ``L`` (higher is better, like SQNR; rank-preserving). Model Optimizer scores a layer x format from the same
  product; it then searches by the summed score, mpq feeds it to its own program.

Either fills the SQNR file of every layer and, mapped by ``1 - 10^(-v/10)`` (monotone), the SSIM file of the
content layers. Sums are float64 per layer and bit, batches in order: a layer's numbers do not depend on which rank
or which other layers are estimated with it (sharded runs write the same files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mpq.calibration.record import CalibData, fp_image_paths
from mpq.errors import MpqError
from mpq.families import family_of
from mpq.images import load_images, to_array
from mpq.metrics import sqnr_db
from mpq.models.loader import is_flow_matching
from mpq.quant.model import QuantModel
from mpq.runner.choices import ESTIMATORS
from mpq.runner.rundir import RunDir


def as_ssim(v: float) -> float:
    """An estimate in dB mapped onto a similarity scale: monotone, 1 at +inf (fisher: 1 - S/L, the estimated loss
    increase as a fraction of the FP loss; local: 1 - noise/signal of the layer's output)."""
    return 1.0 - 10.0 ** (-v / 10.0) if math.isfinite(v) else 1.0


def _quant(layer: Any, x: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    return layer._quant_forward(x, bits, None) if kind == "weight" else layer._quant_forward(x, None, bits)


CACHE_MAX_NUMEL = 1 << 20  # a layer's quantized weights stay cached between batches up to this size


def _drop_big_cache(layer: Any) -> None:
    """No quantized copy of every large layer's weights at once (SDXL: 3 bits x 10 GB); small ones stay cached."""
    if layer.weight.numel() > CACHE_MAX_NUMEL:
        layer._wcache.clear()


def row_images(calib: CalibData, batch_size: int, gen_batch: int) -> list[list[int]]:
    """Per batch of :meth:`CalibData.batches` (``batch_size`` rows of one step, in its order), the rows' FP-image
    index (the Fisher objective's x0)."""
    n = calib.num_samples
    out: list[list[int]] = []
    for k, step in enumerate(calib.steps):
        rows = calib.rows(step)
        if rows % n:
            raise MpqError(f"calibration step {k} holds {rows} rows for {n} prompts; re-run `mpq calib --force`")
        per_row = _row_images(n, rows // n, gen_batch)
        out += [per_row[i : i + batch_size] for i in range(0, rows, batch_size)]
    return out


def _row_images(n: int, halves: int, gen_batch: int) -> list[int]:
    """Which FP image each recorded row of a step belongs to: generation batches of ``gen_batch`` prompts, each
    recorded as ``halves`` (2 under guidance: negative rows, then positive) copies of its prompts."""
    out: list[int] = []
    for start in range(0, n, gen_batch):
        m = min(gen_batch, n - start)
        out += [start + r for _ in range(halves) for r in range(m)]
    return out


# ----------------------------------------------------------------------------- the passes
class _Hooks:
    """Forward hooks on the estimated layers: each call's (input, output) kept; ``grad``: outputs made part of the
    autograd graph (a leaf where the output does not already depend on a tensor that requires grad)."""

    def __init__(self, layers: dict[str, nn.Module], grad: bool) -> None:
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = [m.register_forward_hook(self._hook(n, grad)) for n, m in layers.items()]

    def _hook(self, name: str, grad: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
            x = args[0].detach()
            if grad:
                y = out if out.requires_grad else out.detach().requires_grad_(True)
                if y.requires_grad and not y.is_leaf:
                    y.retain_grad()
                self.seen.setdefault(name, []).append((x, y))
                return y
            self.seen.setdefault(name, []).append((x, out.detach()))
            return None

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def local_batch(
    qm: QuantModel, kwargs: dict[str, Any], names: list[str], kind: str, bits: list[int]
) -> dict[str, list[tuple[float, float]]]:
    """One FP forward; per layer and bit the float64 sums (sum Y^2, sum (Y_q - Y)^2) of its output."""
    hooks = _Hooks({n: qm.layers[n] for n in names}, grad=False)
    try:
        with torch.no_grad():
            qm(**kwargs, return_dict=False)
            out: dict[str, list[tuple[float, float]]] = {}
            for name, calls in hooks.seen.items():
                sums = [[0.0, 0.0] for _ in bits]
                for x, y in calls:
                    yd = y.double()
                    ref = float(yd.pow(2).sum())
                    for s, b in zip(sums, bits):
                        s[0] += ref
                        s[1] += float((_quant(qm.layers[name], x, kind, b).double() - yd).pow(2).sum())
                _drop_big_cache(qm.layers[name])
                out[name] = [(a, c) for a, c in sums]
    finally:
        hooks.close()
    return out


class FisherObjective:
    """The denoising loss on the FP images' latents, noised at the recorded timesteps (see the module)."""

    def __init__(self, pipe: Any, qm: QuantModel, run: RunDir, calib: CalibData, seed: int) -> None:
        self.pipe, self.qm, self.seed = pipe, qm, seed
        self.family = family_of(qm.denoiser)
        self.flow = is_flow_matching(pipe.scheduler)
        self.prediction = str(pipe.scheduler.config.get("prediction_type") or "epsilon")
        if not self.flow and not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise MpqError(
                f"sensitivity.method=fisher needs a scheduler with alphas_cumprod or a flow-matching one; "
                f"{type(pipe.scheduler).__name__} has neither: use sensitivity.method=local"
            )
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise MpqError(f"prediction_type {self.prediction!r} is not one the fisher estimator knows; use local")
        self.latents = self._encode(fp_image_paths(run, calib.num_samples))

    def _encode(self, paths: list[Any]) -> torch.Tensor:
        vae = self.pipe.vae
        images = torch.from_numpy(to_array(load_images(paths))).permute(0, 3, 1, 2)
        p = next(vae.parameters())
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 8):
                z = vae.encode(images[i : i + 8].to(p.device, p.dtype) * 2 - 1).latent_dist.mode()
                out.append(((z - shift) * vae.config.scaling_factor).float().cpu())
        return torch.cat(out)

    def inputs(
        self, kwargs: dict[str, Any], images: list[int], batch: int
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """(denoiser kwargs with the noised sample, the target, the sample) for a batch of rows."""
        key = self.family.sample_key
        sample = kwargs[key]
        x0 = self.family.pack_latents(self.pipe, self.latents[images]).to(sample.device, torch.float32)
        if x0.shape != sample.shape:
            raise MpqError(
                f"the FP images' latents {list(x0.shape)} do not match the recorded samples {list(sample.shape)}; "
                "use sensitivity.method=local"
            )
        g = torch.Generator("cpu").manual_seed(self.seed + batch)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = kwargs["timestep"].reshape(-1).float().to(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if self.flow:
            sigma = self.family.flow_sigma(t).reshape(shape)
            noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        else:
            table = self.pipe.scheduler.alphas_cumprod.to(x0.device)
            ac = table[t.round().long().clamp(0, len(table) - 1)]
            a, s = ac.sqrt().reshape(shape), (1 - ac).sqrt().reshape(shape)
            noisy = a * x0 + s * noise
            target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[self.prediction]
        return {**kwargs, key: noisy.to(sample.dtype)}, target, sample


def fisher_batch(
    qm: QuantModel,
    objective: FisherObjective,
    kwargs: dict[str, Any],
    images: list[int],
    batch: int,
    names: list[str],
    kind: str,
    bits: list[int],
) -> dict[str, list[tuple[float, float]]]:
    """One forward + backward of the denoising loss; per layer and bit the float64 sums (FP loss, sum g^2 (Y_q -
    Y)^2)."""
    inputs, target, sample = objective.inputs(kwargs, images, batch)
    hooks = _Hooks({n: qm.layers[n] for n in names}, grad=True)
    try:
        with torch.enable_grad():
            pred = qm(**inputs, return_dict=False)[0]
            if pred.shape[1] == 2 * sample.shape[1] and pred.dim() == 4:  # learned variance (PixArt): the mean half
                pred = pred[:, : sample.shape[1]]
            loss = (pred.float() - target).pow(2).flatten(1).mean(1).sum()
            loss.backward()
        lv = float(loss.detach().double())
        out: dict[str, list[tuple[float, float]]] = {}
        with torch.no_grad():
            for name, calls in hooks.seen.items():
                sums = [[0.0, 0.0] for _ in bits]
                for x, y in calls:
                    g2 = (y.grad if y.grad is not None else torch.zeros_like(y)).double().pow(2)
                    yd = y.detach()
                    for s, b in zip(sums, bits):
                        s[1] += float((g2 * (_quant(qm.layers[name], x, kind, b).double() - yd.double()).pow(2)).sum())
                for s in sums:
                    s[0] += lv
                _drop_big_cache(qm.layers[name])
                out[name] = [(a, c) for a, c in sums]
    finally:
        hooks.close()
    return out


def estimate_values(sums: list[list[float]]) -> list[float]:
    """A layer's (a, c) sums per bit as dB (local: sum Y^2 / sum err^2; fisher: L / S); +inf for a zero error."""
    return [sqnr_db(a, c) for a, c in sums]


def run_estimator(
    method: str,
    pipe: Any,
    qm: QuantModel,
    cfg: DictConfig,
    run: RunDir,
    calib: CalibData,
    names: list[str],
    bits: list[int],
    kind: str,
    state: dict[str, dict[str, Any]],
) -> Iterator[int]:
    """Continue ``state`` (per layer: batches done, (a, c) sums per bit; :func:`mpq.sensitivity.loop.new_state`)
    over every calibration batch (``calib.batches``) not yet done; yields each batch index done (for progress and
    saving)."""
    from mpq.sensitivity.loop import new_state

    if method not in ESTIMATORS:
        raise MpqError(f"unknown estimator {method!r}; choose from {', '.join(ESTIMATORS)}")
    images = row_images(calib, cfg.sensitivity.batch_size, cfg.sampling.batch_size)
    p = next(qm.denoiser.parameters())
    objective = FisherObjective(pipe, qm, run, calib, int(cfg.sampling.seed)) if method == "fisher" else None
    qm.set_fp()
    for name in names:
        state.setdefault(name, new_state(len(bits)))
    for j, (kwargs, _) in enumerate(calib.batches(cfg.sensitivity.batch_size, p.device, p.dtype)):
        todo = [n for n in names if j not in state[n]["batches"]]
        if not todo:
            continue
        if objective is None:
            res = local_batch(qm, kwargs, todo, kind, bits)
        else:
            res = fisher_batch(qm, objective, kwargs, images[j], j, todo, kind, bits)
        for name in todo:
            st = state[name]
            for acc, (a, c) in zip(st["sums"], res.get(name, [(0.0, 0.0)] * len(bits))):
                acc[0] += a
                acc[1] += c
            st["batches"] = sorted(st["batches"] + [j])
        yield j
