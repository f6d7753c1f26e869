"""Metrics: SQNR on tensors; MSE, PSNR and SSIM (scikit-image) on images."""

from __future__ import annotations

import numpy as np
import torch


def sqnr_db(ref_sq: float, err_sq: float) -> float:
    """10 log10(sum ref^2 / sum err^2); +inf when the error is exactly zero."""
    if err_sq <= 0.0:
        return float("inf")
    return float(10.0 * np.log10(ref_sq / err_sq))


class SqnrAccumulator:
    """SQNR over many batches: sums of squares accumulated in float64."""

    def __init__(self) -> None:
        self.ref_sq = 0.0
        self.err_sq = 0.0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        r = ref.double()
        self.ref_sq += float(r.pow(2).sum())
        self.err_sq += float((out.double() - r).pow(2).sum())

    @property
    def value(self) -> float:
        return sqnr_db(self.ref_sq, self.err_sq)


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    acc = SqnrAccumulator()
    acc.update(out, ref)
    return acc.value


class ErrorStats:
    """How far a tensor (or a stream of tensors) is from its reference: mean absolute error, cosine similarity, SQNR
    (dB) and max absolute error, accumulated in float64 over every :meth:`update` (precision traces, dump
    comparisons). Identical tensors give cosine 1 and SQNR +inf."""

    def __init__(self) -> None:
        self.numel = 0
        self.abs_sum = self.ref_sq = self.err_sq = self.out_sq = self.dot = self.max_abs = 0.0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> ErrorStats:
        o, r = out.detach().to("cpu", torch.float64).reshape(-1), ref.detach().to("cpu", torch.float64).reshape(-1)
        if o.numel() != r.numel():
            raise ValueError(f"{o.numel()} elements against a reference of {r.numel()}")
        d = o - r
        self.numel += int(o.numel())
        self.abs_sum += float(d.abs().sum())
        self.ref_sq += float(r.pow(2).sum())
        self.err_sq += float(d.pow(2).sum())
        self.out_sq += float(o.pow(2).sum())
        self.dot += float((o * r).sum())
        self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)
        return self

    @property
    def exact(self) -> bool:
        return self.err_sq == 0.0

    @property
    def cosine(self) -> float:
        if self.exact:
            return 1.0
        norm = (self.out_sq * self.ref_sq) ** 0.5
        return self.dot / norm if norm > 0 else 0.0

    @property
    def sqnr(self) -> float:
        if self.exact:
            return float("inf")
        return sqnr_db(self.ref_sq, self.err_sq) if self.ref_sq > 0 else float("-inf")

    @property
    def mae(self) -> float:
        return self.abs_sum / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "cos": self.cosine, "sqnr_db": self.sqnr, "max_abs": self.max_abs}


def image_mse(images: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Per-image MSE of [0, 1] images."""
    d = images.astype(np.float64) - refs.astype(np.float64)
    return (d**2).reshape(len(d), -1).mean(axis=1)


def mixdq_window(side: int) -> int:
    """MixDQ's SSIM window: the image side minus one, made odd (512 px -> 511)."""
    w = side - 1
    return w if w % 2 else w - 1


def image_ssim(images: np.ndarray, refs: np.ndarray, kind: str = "gaussian") -> np.ndarray:
    """Per-image SSIM of (N, H, W, 3) images in [0, 1] (scikit-image).

    ``gaussian``: Wang et al.'s local SSIM (Gaussian sigma 1.5, population covariance, data range 1;
    torchmetrics' default definition, ~20x faster on CPU) -- texture and noise weigh in.
    ``mixdq``: MixDQ's content metric: 8-bit images, data range 255, a uniform window of the image
    side minus one (odd) with sample covariance -- a near-global structure score.
    """
    from skimage.metrics import structural_similarity

    if kind == "mixdq":
        win = mixdq_window(min(images.shape[1], images.shape[2]))
        as8 = [np.round(np.asarray(x, dtype=np.float64) * 255).astype(np.uint8) for x in (images, refs)]
        return np.array(
            [structural_similarity(a, b, channel_axis=2, win_size=win, data_range=255) for a, b in zip(*as8)]
        )
    if kind != "gaussian":
        raise ValueError(f"unknown SSIM kind {kind!r} (gaussian or mixdq)")
    return np.array(
        [
            structural_similarity(
                np.asarray(a, dtype=np.float64),
                np.asarray(b, dtype=np.float64),
                channel_axis=2,
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(images, refs)
        ]
    )


def image_psnr(images: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for data range 1: 10 log10(1 / MSE) (+inf for identical images); the same
    numbers as torchmetrics' ``peak_signal_noise_ratio`` (checked in the tests), from the MSE already computed."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / image_mse(images, refs))


def paired_bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(a) / mean(b)`` of two per-image scores of the same images, with the ``level`` percentile interval of
    the ratio over images resampled with replacement (both tools on the same resampled images: paired)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError("paired scores need two equal-length 1-d arrays")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ratios = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), 1e-300)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(a.mean() / max(b.mean(), 1e-300)), float(lo), float(hi)
