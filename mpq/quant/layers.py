"""QuantLinear / QuantConv2d: a float layer with quant params for every candidate bit.

The layer keeps its module path and its parameters (the float module's own
tensors), so names, state dicts and hooks are unchanged. ``w_bits`` /
``a_bits`` select the active bit-widths (None = floating point); the
fake-quantized weight of the active bit is cached, so a forward costs one
activation fake-quant more than the float layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.quant.quantizer import act_qparams, fake_quant, qrange, quantize_weight, running_minmax, weight_scales


class QuantLayer:
    """Mixin holding per-bit quant params and the active bits of one layer."""

    weight: torch.Tensor
    w_scale: dict[int, torch.Tensor]
    a_scale: dict[int, torch.Tensor]
    a_zero: dict[int, torch.Tensor]
    a_range: tuple[torch.Tensor, torch.Tensor] | None

    def _init_quant(self) -> None:
        self.w_scale, self.a_scale, self.a_zero = {}, {}, {}
        self.a_range = None
        self.a_symmetric = False
        self.w_bits: int | None = None
        self.a_bits: int | None = None
        self.observing = False
        self.momentum = 0.95
        self._qweight: torch.Tensor | None = None
        self.multi: tuple[str, list[int]] | None = None  # (weight|act, bits): batch chunk k uses bits[k]
        self._multi_w: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ calibration
    def calibrate_weight(self, bits: list[int], per_channel: bool, method: str, grid: int, min_ratio: float) -> None:
        self.w_scale.update(weight_scales(self.weight, bits, per_channel, method, grid, min_ratio))

    def observe(self, x: torch.Tensor) -> None:
        self.a_range = running_minmax(self.a_range, x, self.momentum)

    def finalize_act(self, bits: list[int], symmetric: bool) -> None:
        if self.a_range is None:
            raise RuntimeError("activation range not observed: the layer never ran during calibration")
        self.a_symmetric = symmetric
        lo, hi = (t.cpu() for t in self.a_range)
        self.a_range = (lo, hi)
        for b in bits:
            self.a_scale[b], self.a_zero[b] = act_qparams(lo, hi, b, symmetric)

    # ------------------------------------------------------------------ activation of bits
    def set_bits(self, w_bits: int | None, a_bits: int | None) -> None:
        for kind, b, table in (("weight", w_bits, self.w_scale), ("activation", a_bits, self.a_scale)):
            if b is not None and b not in table:
                raise KeyError(f"{kind} bit-width {b} was not calibrated (calibrated: {sorted(table)})")
        if w_bits != self.w_bits:
            self._qweight = None
            if w_bits is not None:
                scale = self.w_scale[w_bits].to(self.weight.device)
                self._qweight = quantize_weight(self.weight, scale, w_bits)
        self.w_bits, self.a_bits = w_bits, a_bits

    def set_multi(self, kind: str | None, bits: list[int] | None = None) -> None:
        """Several candidate bits in one pass: the batch is ``len(bits)`` equal chunks, chunk k
        quantized (weights or input activations) at ``bits[k]``; ``kind=None`` ends it."""
        self._multi_w = {}
        if kind is None or bits is None:
            self.multi = None
            return
        table = self.w_scale if kind == "weight" else self.a_scale
        missing = [b for b in bits if b not in table]
        if missing:
            raise KeyError(f"{kind} bit-width {missing[0]} was not calibrated (calibrated: {sorted(table)})")
        if kind == "weight":
            self._multi_w = {b: quantize_weight(self.weight, self.w_scale[b].to(self.weight.device), b) for b in bits}
        self.multi = (kind, list(bits))

    def _fq_act(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        qmin, qmax = qrange(bits, self.a_symmetric)
        return fake_quant(x, self.a_scale[bits].to(x.device), self.a_zero[bits].to(x.device), qmin, qmax)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        return x if self.a_bits is None else self._fq_act(x, self.a_bits)

    def active_weight(self) -> torch.Tensor:
        return self.weight if self._qweight is None else self._qweight

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multi is None:
            return self._apply(self.quantize_input(x), self.active_weight())
        kind, bits = self.multi
        outs = []
        for b, xc in zip(bits, x.chunk(len(bits), dim=0)):
            outs.append(self._apply(self._fq_act(xc, b), self.weight) if kind == "act" else self._apply(xc, self._multi_w[b]))
        return torch.cat(outs)

    # ------------------------------------------------------------------ checkpoint
    def quant_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for b, s in self.w_scale.items():
            state[f"w_scale.{b}"] = s
        for b, s in self.a_scale.items():
            state[f"a_scale.{b}"] = s.reshape(1)
            state[f"a_zero.{b}"] = self.a_zero[b].reshape(1)
        if self.a_range is not None:
            state["a_min"], state["a_max"] = (t.reshape(1) for t in self.a_range)
        return state

    def load_quant_state(self, state: dict[str, torch.Tensor], a_symmetric: bool) -> None:
        self._init_quant()
        self.a_symmetric = a_symmetric
        for key, t in state.items():
            kind, _, b = key.partition(".")
            if kind == "w_scale":
                self.w_scale[int(b)] = t
            elif kind == "a_scale":
                self.a_scale[int(b)] = t.reshape(())
            elif kind == "a_zero":
                self.a_zero[int(b)] = t.reshape(())
        if "a_min" in state:
            self.a_range = (state["a_min"].reshape(()), state["a_max"].reshape(()))


def _adopt(cls: type, module: nn.Module) -> Any:
    """A ``cls`` instance sharing all state (parameters, hooks) of ``module``."""
    q = cls.__new__(cls)
    q.__dict__ = module.__dict__.copy()
    q._init_quant()
    return q


class QuantLinear(nn.Linear, QuantLayer):
    @classmethod
    def from_float(cls, module: nn.Linear) -> QuantLinear:
        return _adopt(cls, module)

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    forward = QuantLayer.forward


class QuantConv2d(nn.Conv2d, QuantLayer):
    @classmethod
    def from_float(cls, module: nn.Conv2d) -> QuantConv2d:
        return _adopt(cls, module)

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)

    forward = QuantLayer.forward
