"""One uniform quantizer, as pure functions on tensors.

Integer grid for ``bits`` b: symmetric -> [-2^(b-1), 2^(b-1) - 1] with zero
point 0; asymmetric -> [0, 2^b - 1] with a zero point. Rounding is to nearest.
All statistics and scales are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer limits (qmin, qmax) of a ``bits``-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (computed in float32, returned in ``x.dtype``)."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def _channel_view(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Weights as (groups, elements): one row per output channel, or one row."""
    wf = w.detach().float()
    return wf.reshape(wf.shape[0], -1) if per_channel else wf.reshape(1, -1)


def weight_scale(
    w: torch.Tensor,
    bits: int,
    per_channel: bool = True,
    method: str = "minmax",
    grid: int = 50,
    min_ratio: float = 0.3,
) -> torch.Tensor:
    """Symmetric weight scale, shape broadcastable to ``w`` ((C_out, 1, ...) or (1, ...)).

    ``minmax``: scale = max|w| / qmax. ``mse``: per group, the clipping ratio
    r in [min_ratio, 1] (``grid`` values) minimizing the quantization MSE,
    scale = r * max|w| / qmax.
    """
    qmin, qmax = qrange(bits, symmetric=True)
    rows = _channel_view(w, per_channel)
    amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=EPS)
    best = amax / qmax
    if method == "mse":
        best_err = torch.full_like(amax, float("inf"))
        for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
            scale = amax * ratio / qmax
            err = (fake_quant(rows, scale, 0.0, qmin, qmax) - rows).pow(2).sum(dim=1, keepdim=True)
            better = err < best_err
            best = torch.where(better, scale, best)
            best_err = torch.where(better, err, best_err)
    elif method != "minmax":
        raise ValueError(f"unknown weight scale method {method!r}")
    return best.reshape((best.shape[0],) + (1,) * (w.dim() - 1))


def weight_scales(
    w: torch.Tensor,
    bits: list[int],
    per_channel: bool = True,
    method: str = "minmax",
    grid: int = 50,
    min_ratio: float = 0.3,
) -> dict[int, torch.Tensor]:
    """:func:`weight_scale` for every bit in ``bits``; min-max shares one abs-max pass across bits."""
    if method != "minmax":
        return {b: weight_scale(w, b, per_channel, method, grid, min_ratio) for b in bits}
    rows = _channel_view(w, per_channel)
    amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=EPS).reshape((rows.shape[0],) + (1,) * (w.dim() - 1))
    return {b: amax / qrange(b, symmetric=True)[1] for b in bits}


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized weight for a symmetric scale from :func:`weight_scale`."""
    qmin, qmax = qrange(bits, symmetric=True)
    return fake_quant(w, scale, 0.0, qmin, qmax)


def act_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of a per-tensor activation quantizer from a [lo, hi] range.

    The range is widened to contain 0 so that zero is exactly representable.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi).clamp(min=EPS) / qmax
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point


def running_minmax(
    state: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update running (min, max) with one batch: r = m * r + (1 - m) * batch (first batch initializes).

    Kept hand-written rather than torch.ao's ``MovingAverageMinMaxObserver``: that computes
    ``r + c * (batch - r)``, which rounds differently from MixDQ's formula (so ranges, and every score
    after them, would move in the last bits), and it is a module: one per layer part would join the
    module tree that hooks and the prefix cache walk, where two buffers do the job."""
    xf = x.detach().float()
    lo, hi = xf.amin(), xf.amax()
    if state is None:
        return lo, hi
    return momentum * state[0] + (1 - momentum) * lo, momentum * state[1] + (1 - momentum) * hi


def weight_integers(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers behind :func:`quantize_weight` (int8): ``quantize_weight(w, s, b)`` equals
    ``(weight_integers(w, s, b).float() * s).to(w.dtype)`` exactly."""
    qmin, qmax = qrange(bits, symmetric=True)
    return torch.clamp(torch.round(w.float() / scale), qmin, qmax).to(torch.int8)
