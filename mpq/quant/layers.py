"""QuantLinear / QuantConv2d: a float layer with quant params for every candidate bit.

The layer keeps its module path and its parameters (the float module's own
tensors), so names, hooks and the float state dict are unchanged. Quant params
are registered buffers, so ``.to()``, ``.half()``, ``state_dict()`` and offload
hooks treat them as any module's tensors:

* ``qbits`` (n_bits,): the candidate bit-widths, in order;
* ``w_scale``, ``w_offset`` (n_bits, rows, groups): the weight quantizer's scale (and offset: asymmetric
  levels; zero when symmetric) per output channel (row; one row at ``tensor`` granularity) and group of
  input columns (:class:`~mpq.quant.quantizer.WeightQuant`, the layer's ``wq``: one group per input part at
  MixDQ's ``channel`` granularity);
* ``a_scale``, ``a_zero`` (n_bits, n_parts): per-tensor activation scale and zero point;
* ``a_range`` (n_parts, 2): the observed running (min, max) of the input.

* ``wf_<slug>_<param>``: the parameters of the other weight formats (``formats``,
  :mod:`mpq.quant.formats`; e.g. ``wf_nf_ratio`` / ``wf_nf_smax``, shared by every ``nf<k>``).

``n_parts`` > 1 splits a concatenated input (``in_split``, e.g. a UNet skip
concatenation) into parts with their own weight and activation quantizers.
``bos_aware`` layers (cross-attention ``to_k``/``to_v``) compute the first
(BOS) token with FP weights and activations and leave it out of the range.

``w_bits`` / ``a_bits`` select the active bit-widths (None = floating point);
``w_bits`` may also name a format (``"nf12"``); the fake-quantized weight of
each candidate is cached until the module is moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.quant.formats import Format, Key, parse_format
from mpq.quant.quantizer import (
    WeightQuant,
    act_qparams,
    expand_params,
    fake_quant,
    grouped_fake_quant,
    grouped_qparams,
    qrange,
    running_minmax,
)

BUFFERS = ("qbits", "w_scale", "w_offset", "a_scale", "a_zero", "a_range")


def split_input(x: torch.Tensor, in_split: Sequence[int], dim: int) -> tuple[torch.Tensor, ...]:
    """``x`` cut along ``dim`` into the parts of ``in_split`` (one part: ``x`` itself)."""
    if len(in_split) == 2:
        return (x,)
    return x.split([hi - lo for lo, hi in zip(in_split, in_split[1:])], dim=dim)


def fake_quant_input(
    x: torch.Tensor,
    in_split: Sequence[int],
    dim: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
) -> torch.Tensor:
    """Each input part fake-quantized with its per-tensor ``scale[p]`` / ``zero[p]`` at ``bits``."""
    qmin, qmax = qrange(bits, symmetric)
    parts = [fake_quant(part, scale[p], zero[p], qmin, qmax) for p, part in enumerate(split_input(x, in_split, dim))]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class QuantLayer:
    """Mixin holding the quant params of one Linear/Conv2d and its active bits."""

    weight: torch.Tensor
    qbits: torch.Tensor
    w_scale: torch.Tensor
    a_scale: torch.Tensor
    a_zero: torch.Tensor
    a_range: torch.Tensor
    register_buffer: Callable[..., None]

    def _init_quant(self) -> None:
        self.in_split: tuple[int, ...] = (0, self.weight.shape[1])
        self.bos_aware = False
        self.act_numel = 0  # input elements per sample, as traced at PTQ (the layer description's, for the cost model)
        self.a_symmetric = False
        self.wq = WeightQuant()
        self._groups: torch.Tensor | None = None
        self.w_bits: int | None = None
        self.a_bits: int | None = None
        self.observing = False
        self.a_observed = False
        self.momentum = 0.95
        self.observe_repeats = 1  # range updates per batch (MixDQ: one per candidate bit)
        self.observe_bits: int | None = None  # quantize W and A at these bits while observing (MixDQ: 8), else FP
        self._wcache: dict[Key, torch.Tensor] = {}
        self.formats: dict[str, Format] = {}  # the weight formats calibrated besides the integer bits
        self.multi: tuple[str, list[int]] | None = None  # (weight|act, bits): batch chunk k uses bits[k]

    def init_quant(
        self,
        bits: Sequence[int],
        in_split: Sequence[int] | None = None,
        bos_aware: bool = False,
        a_symmetric: bool = False,
        act_numel: int = 0,
        wq: WeightQuant | None = None,
        formats: Sequence[str] = (),
    ) -> None:
        """(Re)allocate the buffers for ``bits``, the weight quantizer ``wq`` (default: MixDQ's) and the other
        weight ``formats`` (zeros until calibrated or loaded)."""
        self.wq = wq or WeightQuant()
        self._groups = None
        self.act_numel = int(act_numel)
        self.in_split = tuple(in_split) if in_split else (0, self.weight.shape[1])
        if (
            self.in_split[0] != 0
            or self.in_split[-1] != self.weight.shape[1]
            or list(self.in_split) != sorted(set(self.in_split))
        ):
            raise ValueError(f"in_split {self.in_split} does not partition the {self.weight.shape[1]} input channels")
        self.bos_aware, self.a_symmetric = bos_aware, a_symmetric
        n, parts, dev = len(bits), len(self.in_split) - 1, self.weight.device
        self.register_buffer("qbits", torch.tensor(list(bits), dtype=torch.int64, device=dev))
        self._bits: list[int] | None = [int(b) for b in bits]
        shape = tuple(self.weight.shape)
        rows, groups = self.wq.rows(shape), self.wq.n_groups(shape, self.in_split)
        self.register_buffer("w_scale", torch.zeros(n, rows, groups, device=dev))
        self.register_buffer("w_offset", torch.zeros(n, rows, groups, device=dev))
        self.register_buffer("a_scale", torch.zeros(n, parts, device=dev))
        self.register_buffer("a_zero", torch.zeros(n, parts, device=dev))
        self.register_buffer("a_range", torch.zeros(parts, 2, device=dev))
        for buf in [b for b in self._buffers if b.startswith("wf_")]:
            del self._buffers[buf]
        self.formats = {f.name: f for f in (parse_format(n) for n in formats)}
        for fmt in self.formats.values():
            for param, (pshape, dtype) in fmt.param_shapes(shape, self.in_split).items():
                if f"wf_{fmt.slug}_{param}" not in self._buffers:
                    self.register_buffer(f"wf_{fmt.slug}_{param}", torch.zeros(pshape, dtype=dtype, device=dev))
        self.a_observed = False
        self.w_bits = self.a_bits = None
        self._wcache = {}

    @property
    def bits(self) -> list[int]:
        """The calibrated bit-widths (mirrors the ``qbits`` buffer, readable on any device, ``meta`` included)."""
        if not hasattr(self, "qbits"):
            return []
        if getattr(self, "_bits", None) is None or len(self._bits) != self.qbits.numel():
            self._bits = [int(b) for b in self.qbits.tolist()]
        return self._bits

    @property
    def n_parts(self) -> int:
        return len(self.in_split) - 1

    @property
    def weight_keys(self) -> list[Key]:
        """The weight candidates: the calibrated bit-widths, then the other formats."""
        return [*self.bits, *self.formats]

    def _index(self, bits: Key, kind: str) -> int:
        if kind == "weight" and isinstance(bits, str):
            if bits not in self.formats:
                raise KeyError(f"weight format {bits} was not calibrated (calibrated: {self.weight_keys})")
            return len(self.bits) + list(self.formats).index(bits)
        cand = self.bits
        if bits not in cand:
            raise KeyError(f"{kind} bit-width {bits} was not calibrated (calibrated: {cand})")
        return cand.index(bits)

    def format_params(self, fmt: Format) -> dict[str, torch.Tensor]:
        """A format's calibrated parameters (its ``wf_`` buffers)."""
        prefix = f"wf_{fmt.slug}_"
        return {k[len(prefix) :]: t for k, t in self._buffers.items() if k.startswith(prefix) and t is not None}

    def _input_dim(self) -> int:
        return 1 if isinstance(self, nn.Conv2d) else -1

    # ------------------------------------------------------------------ calibration
    @property
    def column_groups(self) -> torch.Tensor:
        """The weight quantizer's group of every input column (cached; see :class:`WeightQuant`)."""
        if self._groups is None or self._groups.device != self.weight.device:
            self._groups = self.wq.column_groups(tuple(self.weight.shape), self.in_split).to(self.weight.device)
        return self._groups

    def weight_params(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) at ``bits``, spread to broadcast over the weight."""
        k = self._index(bits, "weight")
        shape = tuple(self.weight.shape)
        g = self.column_groups
        return expand_params(self.w_scale[k], g, shape), expand_params(self.w_offset[k], g, shape)

    def calibrate_weight(self) -> None:
        """Every candidate bit's weight scale (and offset) from the weight, as ``wq`` says."""
        params = grouped_qparams(self.weight, self.bits, self.wq, self.in_split)
        for k, b in enumerate(self.bits):
            self.w_scale[k], self.w_offset[k] = params[b]
        for slug, fmt in {f.slug: f for f in self.formats.values()}.items():  # every nf<k> shares one set
            for param, t in fmt.calibrate(self.weight, self.in_split).items():
                self._buffers[f"wf_{slug}_{param}"].copy_(t)
        self._wcache = {}

    def observe(self, x: torch.Tensor) -> None:
        if self.bos_aware and x.dim() == 3:
            x = x[:, 1:]
        for p, part in enumerate(self._parts(x)):
            prev = (self.a_range[p, 0], self.a_range[p, 1]) if self.a_observed else None
            lo, hi = running_minmax(prev, part, self.momentum)
            self.a_range[p, 0], self.a_range[p, 1] = lo, hi
        self.a_observed = True

    def finalize_act(self) -> None:
        if not self.a_observed:
            raise RuntimeError("activation range not observed: the layer never ran during calibration")
        for k, b in enumerate(self.bits):
            for p in range(self.n_parts):
                self.a_scale[k, p], self.a_zero[k, p] = act_qparams(
                    self.a_range[p, 0], self.a_range[p, 1], b, self.a_symmetric
                )

    # ------------------------------------------------------------------ activation of bits
    def set_bits(self, w_bits: Key | None, a_bits: int | None) -> None:
        for kind, b in (("weight", w_bits), ("activation", a_bits)):
            if b is not None:
                self._index(b, kind)
        self.w_bits, self.a_bits = w_bits, a_bits

    def set_multi(self, kind: str | None, bits: list[Key] | None = None) -> None:
        """Several candidate bits in one pass: the batch is ``len(bits)`` equal chunks, chunk k
        quantized (weights or input activations) at ``bits[k]``; ``kind=None`` ends it."""
        if kind is None or bits is None:
            self.multi = None
            return
        for b in bits:
            self._index(b, kind)
        self.multi = (kind, list(bits))

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_input(x, self.in_split, self._input_dim())

    def _fq_act(self, x: torch.Tensor, bits: int | None) -> torch.Tensor:
        if bits is None:
            return x
        k = self._index(bits, "activation")
        return fake_quant_input(
            x, self.in_split, self._input_dim(), self.a_scale[k], self.a_zero[k], bits, self.a_symmetric
        )

    def weight_at(self, bits: Key | None) -> torch.Tensor:
        """The weight fake-quantized at ``bits`` (or in the format it names; cached), or the float weight."""
        if bits is None:
            return self.weight
        if isinstance(bits, str) and bits not in self._wcache:
            self._index(bits, "weight")
            fmt = self.formats[bits]
            self._wcache[bits] = fmt.fake_quant(self.weight, self.format_params(fmt), self.in_split)
        if bits not in self._wcache:
            scale, offset = self.weight_params(bits)
            self._wcache[bits] = grouped_fake_quant(self.weight, scale, offset, bits, self.wq.asymmetric)
        return self._wcache[bits]

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _quant_forward(self, x: torch.Tensor, w_bits: Key | None, a_bits: int | None) -> torch.Tensor:
        if self.bos_aware and x.dim() == 3 and (w_bits is not None or a_bits is not None):
            head = self._op(x[:, :1], self.weight)  # the BOS token: FP weights and activations
            return torch.cat([head, self._op(self._fq_act(x[:, 1:], a_bits), self.weight_at(w_bits))], dim=1)
        return self._op(self._fq_act(x, a_bits), self.weight_at(w_bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            for _ in range(self.observe_repeats):
                self.observe(x)
            if self.observe_bits is not None:  # MixDQ calibrates with the quantizers on, using the ranges so far
                self.finalize_act()
                return self._quant_forward(x, self.observe_bits, self.observe_bits)
        if self.multi is None:
            return self._quant_forward(x, self.w_bits, self.a_bits)
        kind, bits = self.multi
        chunks = x.chunk(len(bits), dim=0)
        return torch.cat(
            [
                self._quant_forward(c, b, None) if kind == "weight" else self._quant_forward(c, None, b)
                for b, c in zip(bits, chunks)
            ]
        )

    # ------------------------------------------------------------------ torch plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        self._wcache = {}  # moved or cast: the cached quantized weights are stale
        self._groups = None
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._wcache = {}
        self._bits = None  # re-read from the loaded qbits
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def quant_state(self) -> dict[str, torch.Tensor]:
        state = {b: getattr(self, b) for b in BUFFERS if hasattr(self, b)}
        return state | {k: t for k, t in self._buffers.items() if k.startswith("wf_") and t is not None}

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        formats = f", formats={list(self.formats)}" if self.formats else ""
        extra = f", bits={self.bits}{formats}, w_bits={self.w_bits}, a_bits={self.a_bits}, weight_quant={self.wq.label}"
        if self.n_parts > 1:
            extra += f", in_split={self.in_split}"
        return base + extra + (", bos_aware=True" if self.bos_aware else "")


def _adopt(cls: type, module: nn.Module) -> Any:
    """A ``cls`` instance sharing all state (parameters, buffers, hooks) of ``module``."""
    q = cls.__new__(cls)
    q.__dict__ = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        q.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])  # own containers: new buffers stay on q
    q._init_quant()
    return q


class QuantLinear(QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, module: nn.Linear) -> QuantLinear:
        return _adopt(cls, module)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    forward = QuantLayer.forward


class QuantConv2d(QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, module: nn.Conv2d) -> QuantConv2d:
        return _adopt(cls, module)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)

    forward = QuantLayer.forward
