"""``sensitivity.method=hybrid``: an estimate for every layer, the exact metric where the estimate's choice is
uncertain, and the estimate put on the exact scale elsewhere (pure functions; the stage runs them).

*Uncertain* layers are the ones the program fights over: the ``fraction`` most sensitive layers by the estimate at
any candidate bit (lowest estimate first). Their exact scores replace the estimate; they also fit, per bit, an
affine map ``exact ~ alpha + beta * estimate`` (least squares over the finite pairs) that puts every other layer's
estimate on the exact metric's scale, so the program sums numbers of one scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def uncertain_layers(estimate: Mapping[str, list[float]], fraction: float) -> list[str]:
    """The ceil(``fraction`` x layers) most sensitive layers by the estimate at each bit, united, in the estimate's
    order."""
    names = list(estimate)
    if not names or fraction <= 0:
        return []
    n = min(len(names), math.ceil(len(names) * fraction - 1e-9))
    chosen: set[str] = set()
    for j in range(len(next(iter(estimate.values())))):
        chosen |= set(sorted(names, key=lambda name: (estimate[name][j], name))[:n])
    return [name for name in names if name in chosen]


def affine_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """(alpha, beta) of ``y ~ alpha + beta * x`` by least squares over the finite pairs; an offset only (beta 1)
    when fewer than 3 pairs or no spread in ``x``; (0, 1) with no pair."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return 0.0, 1.0
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if len(pairs) < 3 or float(np.ptp(xs)) == 0.0:
        return float(np.mean(ys - xs)), 1.0
    beta, alpha = np.polyfit(xs, ys, 1)
    return float(alpha), float(beta)


def calibrate(
    estimate: Mapping[str, list[float]], exact: Mapping[str, list[float]], n_bits: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Every layer on the exact scale: ``exact`` where given, the fitted map of ``estimate`` elsewhere; and the fit
    per bit."""
    fit = []
    for j in range(n_bits):
        alpha, beta = affine_fit([estimate[n][j] for n in exact], [exact[n][j] for n in exact])
        fit.append({"alpha": alpha, "beta": beta})
    out: dict[str, list[float]] = {}
    for name, vals in estimate.items():
        if name in exact:
            out[name] = list(exact[name])
        else:
            out[name] = [f["alpha"] + f["beta"] * v if math.isfinite(v) else v for f, v in zip(fit, vals)]
    return out, fit
