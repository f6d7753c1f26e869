"""``sensitivity.method=hybrid``: an estimate for every layer, the exact metric where the estimate's choice is
uncertain, and the estimate put on the exact scale elsewhere (pure functions; the stage runs them).

*Uncertain* layers are the ones the program fights over: the ``fraction`` most sensitive layers by the estimate at
any candidate bit (lowest estimate first). Their exact scores replace the estimate; they also give, per bit, the
offset ``median(exact - estimate)`` that puts every other layer's estimate on the exact metric's scale (both are
dB), so the program sums numbers of one scale. An offset, not a least-squares line: the uncertain layers cluster at
the sensitive end, and a line fitted there extrapolates badly (on the tiny random model its slope came out negative
at W2 and the file ranked layers worse than the estimate alone, rho -0.41 against 0.95; the offset gives 0.97).
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


def offset_fit(x: list[float], y: list[float]) -> float:
    """``median(y - x)`` over the finite pairs; 0 with none."""
    diffs = [b - a for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    return float(np.median(diffs)) if diffs else 0.0


def calibrate(
    estimate: Mapping[str, list[float]], exact: Mapping[str, list[float]], n_bits: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Every layer on the exact scale: ``exact`` where given, ``estimate`` + the per-bit offset elsewhere; and the
    offsets."""
    fit = [{"offset": offset_fit([estimate[n][j] for n in exact], [exact[n][j] for n in exact])} for j in range(n_bits)]
    out: dict[str, list[float]] = {}
    for name, vals in estimate.items():
        if name in exact:
            out[name] = list(exact[name])
        else:
            out[name] = [v + f["offset"] if math.isfinite(v) else v for f, v in zip(fit, vals)]
    return out, fit
