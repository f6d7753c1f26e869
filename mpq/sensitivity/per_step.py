"""Per-step sensitivity: each layer's SQNR at each denoiser call of a generation, not summed over them.

The search uses one SQNR per layer over every recorded call. Whether a plan per
step (ViDiT-Q's timestep-aware precision) could pay off depends on whether the
layers' order changes between early (noisy) and late steps: the same loop as
the stage, one recorded call at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mpq.calibration.record import CalibData
from mpq.quant.model import QuantModel
from mpq.runner.progress import progress
from mpq.sensitivity.loop import LoopOptions, score_layers
from mpq.sensitivity.scorers import Sqnr


def per_step_sqnr(
    pipe: Any, qm: QuantModel, cfg: DictConfig, calib: CalibData, names: Sequence[str], bits: Sequence[int], kind: str
) -> dict[str, np.ndarray]:
    """{layer: SQNR dB, shape (len(bits), calls)}: ``kind`` (weight | act) of each layer quantized alone at each bit,
    scored on each recorded denoiser call separately (both guidance halves of a call together)."""
    out = {n: np.zeros((len(bits), len(calib.steps))) for n in names}
    for s, step in enumerate(progress(calib.steps, desc=f"per-step sensitivity {kind}", unit="call")):
        scorer = Sqnr(pipe, qm, cfg, CalibData([step], calib.meta))
        scores = score_layers(qm, scorer, list(names), list(bits), kind, LoopOptions(fast=True))
        for n in names:
            out[n][:, s] = scores[n]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (no ties expected among float SQNRs; ties get arbitrary but fixed ranks)."""
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else 1.0


def step_agreement(table: dict[str, np.ndarray], bit_index: int) -> dict[str, Any]:
    """For one candidate bit: the layers' rank correlation between the first and every later call, the mean and
    largest |SQNR(last) - SQNR(first)|, and the share of the most sensitive quarter at the first call that is still
    in the most sensitive quarter at the last. Layers whose quantization leaves the output unchanged at some call
    (infinite SQNR) are left out and counted."""
    every = sorted(table)
    names = [n for n in every if np.isfinite(table[n][bit_index]).all()]
    m = np.stack([table[n][bit_index] for n in names])  # (layers, calls)
    first, last = m[:, 0], m[:, -1]
    quarter = max(1, len(names) // 4)
    worst_first = set(np.argsort(first)[:quarter].tolist())
    worst_last = set(np.argsort(last)[:quarter].tolist())
    delta = last - first
    return {
        "spearman_vs_first": [spearman(first, m[:, s]) for s in range(m.shape[1])],
        "mean_db": m.mean(axis=0).tolist(),
        "mean_abs_delta_db": float(np.abs(delta).mean()),
        "max_abs_delta_db": float(np.abs(delta).max()),
        "largest_changes": [(names[i], float(delta[i])) for i in np.argsort(-np.abs(delta))[:5]],
        "worst_quarter_kept": len(worst_first & worst_last) / quarter,
        "no_effect": sorted(set(every) - set(names)),
    }
