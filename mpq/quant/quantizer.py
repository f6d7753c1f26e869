"""One uniform quantizer, as pure functions on tensors.

Integer grid for ``bits`` b: symmetric -> [-2^(b-1), 2^(b-1) - 1] with zero
point 0; asymmetric -> [0, 2^b - 1] with a zero point. Rounding is to nearest.
All statistics and scales are computed in float32 whatever the model dtype.

Weights (:class:`WeightQuant`) are quantized per *group*: a weight (C_out, C_in,
*kernel) is read as rows (output channels) by columns (input channel x kernel
position, in memory order: column ``c * K + k``); every column belongs to one
group, groups never cross an input part (``in_split``), and a group has its own
parameters in each row (in one row shared by all output channels at
``tensor`` granularity). Two level sets:

* ``symmetric`` (MixDQ): ``w = q * scale``, q in [-2^(b-1), 2^(b-1) - 1] with
  min-max scale ``max|w| / (2^(b-1) - 1)``: 2^b - 1 levels reachable (W2 is ternary);
* ``asymmetric``: ``w = q * scale + offset``, q in [0, 2^b - 1], offset = the
  group's minimum, scale = (max - min) / (2^b - 1): all 2^b levels (SDNQ's
  unsigned types, HQQ), one more stored parameter a group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mpq.runner.choices import GRANULARITIES, LEVELS, SCALE_METHODS

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


# ----------------------------------------------------------------------------- grouped weight quantizer


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized: level set, scale granularity, range (``quant.weight`` in the config).

    ``granularity``: ``tensor`` (one scale per input part), ``channel`` (per output channel and part; MixDQ),
    ``kernel`` (per output channel, part and kernel position: a conv's k x k taps get their own scales; a
    linear layer as ``channel``), ``group`` (per output channel, kernel position and block of ``group_size``
    consecutive input channels of a part; a part's last block may be shorter). ``method``: ``minmax``, or
    ``mse`` (per group, the range shrunk by the ratio in [``min_ratio``, 1] (``grid`` values) of least error).
    """

    levels: str = "symmetric"
    granularity: str = "channel"
    group_size: int = 64
    method: str = "minmax"
    grid: int = 50
    min_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.levels not in LEVELS:
            raise ValueError(f"unknown weight levels {self.levels!r} (known: {', '.join(LEVELS)})")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown weight granularity {self.granularity!r} (known: {', '.join(GRANULARITIES)})")
        if self.method not in SCALE_METHODS:
            raise ValueError(f"unknown weight scale method {self.method!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, not {self.group_size}")

    @classmethod
    def from_config(cls, wq: Any) -> WeightQuant:
        """From the config's ``quant.weight`` section (or a manifest's copy of it)."""
        get = wq.get if isinstance(wq, Mapping) else lambda k, d=None: getattr(wq, k, d)
        return cls(
            str(get("levels", "symmetric") or "symmetric"),
            str(get("granularity", "channel")),
            int(get("group_size", 64) or 64),
            str(get("scale_method", "minmax")),
            int(get("mse_grid", 50)),
            float(get("mse_min_ratio", 0.3)),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def asymmetric(self) -> bool:
        return self.levels == "asymmetric"

    @property
    def label(self) -> str:
        """A short name: ``sym-channel``, ``asym-group64``, ... (``-mse`` for the MSE range)."""
        g = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.levels[:4] if self.asymmetric else 'sym'}-{g}" + ("-mse" if self.method == "mse" else "")

    # -------------------------------------------------------------- layout (pure arithmetic)
    def rows(self, shape: Sequence[int]) -> int:
        """Rows of parameters: one per output channel, or one (``tensor``)."""
        return 1 if self.granularity == "tensor" else int(shape[0])

    def part_groups(self, width: int, kernel: int) -> int:
        """Groups of an input part ``width`` channels wide, with ``kernel`` positions."""
        if self.granularity in ("tensor", "channel"):
            return 1
        if self.granularity == "kernel":
            return kernel
        return -(-width // self.group_size) * kernel

    def n_groups(self, shape: Sequence[int], in_split: Sequence[int]) -> int:
        kernel = math.prod(shape[2:])
        return sum(self.part_groups(hi - lo, kernel) for lo, hi in zip(in_split, in_split[1:]))

    def n_params(self, shape: Sequence[int], in_split: Sequence[int]) -> int:
        """Stored quantizer parameters of one weight: a scale (and an offset, asymmetric) per row and group."""
        return self.rows(shape) * self.n_groups(shape, in_split) * (2 if self.asymmetric else 1)

    def column_groups(self, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        """The group of every column (C_in x kernel positions, memory order), int64."""
        kernel = math.prod(shape[2:])
        out, offset = [], 0
        for lo, hi in zip(in_split, in_split[1:]):
            c = torch.arange(hi - lo).repeat_interleave(kernel)  # input channel within the part
            k = torch.arange(kernel).repeat(hi - lo)  # kernel position
            if self.granularity in ("tensor", "channel"):
                g = torch.zeros_like(c)
            elif self.granularity == "kernel":
                g = k
            else:
                g = (c // self.group_size) * kernel + k
            out.append(g + offset)
            offset += self.part_groups(hi - lo, kernel)
        return torch.cat(out)


def _by_group(rows: torch.Tensor, groups: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """(R, N) values reduced over the columns of each of ``n`` groups -> (R, n) (``amax``/``amin``/``sum``)."""
    idx = groups.to(rows.device).expand(rows.shape[0], -1)
    out = torch.zeros(rows.shape[0], n, dtype=rows.dtype, device=rows.device)
    if how == "sum":
        return out.scatter_add_(1, idx, rows)
    return out.scatter_reduce_(1, idx, rows, how, include_self=False)


def expand_params(p: torch.Tensor, groups: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Per-(row, group) parameters (R, G) spread over a weight of ``shape`` (broadcastable: (R, C_in, *kernel))."""
    return p[:, groups.to(p.device)].reshape((p.shape[0],) + tuple(shape[1:]))


def grouped_fake_quant(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, asymmetric: bool
) -> torch.Tensor:
    """``w`` quantized and dequantized with expanded (broadcastable) ``scale`` / ``offset``, computed in float32."""
    q = grouped_codes(w, scale, offset, bits, asymmetric)
    return dequantize_codes(q, scale, offset, asymmetric).to(w.dtype)


def grouped_codes(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, asymmetric: bool
) -> torch.Tensor:
    """The integer codes (float32 values) of ``w``: symmetric in [-2^(b-1), 2^(b-1) - 1], asymmetric in [0, 2^b - 1]."""
    wf = w.float()
    if asymmetric:
        return torch.clamp(torch.round((wf - offset) / scale), 0, 2**bits - 1)
    qmin, qmax = qrange(bits, symmetric=True)
    return torch.clamp(torch.round(wf / scale), qmin, qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, asymmetric: bool) -> torch.Tensor:
    """Codes back to float32: ``q * scale`` (+ ``offset``, asymmetric): the one formula fake quant and export share."""
    out = q.float() * scale
    return out + offset if asymmetric else out


def grouped_qparams(
    w: torch.Tensor, bits: Sequence[int], spec: WeightQuant, in_split: Sequence[int] | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per bit, the (scale, offset) of ``w`` under ``spec``, each (rows, groups) float32 (offset zero when
    symmetric)."""
    shape = tuple(w.shape)
    split = tuple(in_split) if in_split else (0, shape[1])
    groups = spec.column_groups(shape, split).to(w.device)
    n = spec.n_groups(shape, split)
    rows = w.detach().float().reshape(shape[0], -1)
    if spec.asymmetric:
        hi, lo = _by_group(rows, groups, n, "amax"), _by_group(rows, groups, n, "amin")
        if spec.granularity == "tensor":
            hi, lo = hi.amax(dim=0, keepdim=True), lo.amin(dim=0, keepdim=True)
    else:
        amax = _by_group(rows.abs(), groups, n, "amax")
        if spec.granularity == "tensor":
            amax = amax.amax(dim=0, keepdim=True)
        amax = amax.clamp(min=EPS)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ratios = torch.linspace(1.0, spec.min_ratio, spec.grid).tolist() if spec.method == "mse" else [1.0]
    for b in bits:
        best_s = best_o = best_err = None
        for r in ratios:
            if spec.asymmetric:
                s, o = ((hi - lo) * r / (2**b - 1)).clamp(min=EPS), lo * r
            else:
                s, o = amax * r / qrange(b, symmetric=True)[1], torch.zeros_like(amax)
            if len(ratios) == 1:
                best_s, best_o = s, o
                break
            se, oe = expand_params(s, groups, shape).reshape(s.shape[0], -1), expand_params(o, groups, shape)
            err = (grouped_fake_quant(rows, se, oe.reshape(o.shape[0], -1), b, spec.asymmetric) - rows).pow(2)
            err = _by_group(err.sum(dim=0, keepdim=True) if s.shape[0] == 1 else err, groups, n, "sum")
            if best_err is None:
                best_s, best_o, best_err = s, o, err
            else:
                better = err < best_err
                best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
                best_err = torch.where(better, err, best_err)
        assert best_s is not None and best_o is not None
        out[int(b)] = (best_s, best_o)
    return out
