"""QuantLinear / QuantConv2d: a float layer with quant params for every candidate bit.

The layer keeps its module path and its parameters (the float module's own
tensors), so names, hooks and the float state dict are unchanged. Quant params
are registered buffers, so ``.to()``, ``.half()``, ``state_dict()`` and offload
hooks treat them as any module's tensors:

* ``qbits`` (n_bits,): the candidate bit-widths, in order;
* every weight candidate's parameters (its :class:`~mpq.quant.formats.base.Format`'s, in the buffers of its bank:
  :mod:`mpq.quant.banks`): the checkpoint's integer quantizer at each bit-width (the layer's ``wq``,
  :class:`~mpq.quant.quantizer.WeightQuant`) in ``w_scale``, ``w_offset`` (n_bits, rows, groups): scale (and
  offset: asymmetric levels; zero when symmetric) per output channel (row; one row at ``tensor`` granularity)
  and group of input columns (one group per input part at MixDQ's ``channel`` granularity); the other weight
  formats (``formats``) in ``wf_<slug>_<param>`` (e.g. ``wf_nf_ratio`` / ``wf_nf_smax``, shared by every ``nf<k>``);
* ``a_scale``, ``a_zero`` (n_bits, n_parts): per-tensor activation scale and zero point;
* ``a_range`` (n_parts, 2): the observed running (min, max) of the input;
* with step groups (``quant.act.step_groups`` G > 1, :mod:`mpq.quant.steps`), the same per group of sampling
  steps besides the all-steps ones: ``a_step_scale``, ``a_step_zero`` (G, n_bits, n_parts), ``a_step_range``
  (G, n_parts, 2), and the groups' timestep boundaries ``a_step_bounds`` (G - 1,). The denoiser's pre-hook sets
  ``a_group`` on each call, and it stays until the next one (the estimators score a call's recorded inputs after
  it returns); before the first call the all-steps range applies.

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

from mpq.errors import MpqError
from mpq.quant.banks import Slot, calibrators, layout
from mpq.quant.formats import Format, Key, ParamShapes, resolve
from mpq.quant.quantizer import WeightQuant, act_qparams, fake_quant, qrange, running_minmax
from mpq.quant.steps import StepRanges


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


class QuantLayer(StepRanges):
    """Mixin holding the quant params of one Linear/Conv2d and its active bits."""

    weight: torch.Tensor
    qbits: torch.Tensor
    a_scale: torch.Tensor
    a_zero: torch.Tensor
    a_range: torch.Tensor
    _buffers: dict[str, torch.Tensor | None]
    register_buffer: Callable[..., None]

    def _init_quant(self) -> None:
        self.in_split: tuple[int, ...] = (0, self.weight.shape[1])
        self.bos_aware = False
        self.act_numel = 0  # input elements per sample, as traced at PTQ (the layer description's, for the cost model)
        self.a_symmetric = False
        self.wq = WeightQuant()
        self.w_bits: Key | None = None
        self.a_bits: int | None = None
        self.observing = False
        self.a_observed = False
        self.momentum = 0.95
        self.observe_repeats = 1  # range updates per batch (MixDQ: one per candidate bit)
        self.observe_bits: int | None = None  # quantize W and A at these bits while observing (MixDQ: 8), else FP
        self._wcache: dict[Key, torch.Tensor] = {}
        self.weight_formats: dict[Key, Format] = {}  # every weight candidate: the integer bits, then ``formats``
        self.formats: dict[str, Format] = {}  # the weight formats calibrated besides the integer bits
        self._slots: dict[Key, Slot] = {}  # where each weight candidate's parameters live (:mod:`mpq.quant.banks`)
        self._quant_buffers: tuple[str, ...] = ()  # the buffers :meth:`init_quant` registered
        self.multi: tuple[str, list[Key]] | None = None  # (weight|act, bits): batch chunk k uses bits[k]
        self.step_groups = 1  # activation ranges per group of sampling steps (:mod:`mpq.quant.steps`)
        self.a_group: int | None = None  # the step group of the latest denoiser call (set by its pre-hook)
        self.a_step_observed: set[int] = set()  # the step groups whose range has been observed

    def init_quant(
        self,
        bits: Sequence[int],
        in_split: Sequence[int] | None = None,
        bos_aware: bool = False,
        a_symmetric: bool = False,
        act_numel: int = 0,
        wq: WeightQuant | None = None,
        formats: Sequence[str] = (),
        step_bounds: Sequence[float] = (),
    ) -> None:
        """(Re)allocate the buffers for ``bits``, the weight quantizer ``wq`` (default: MixDQ's), the other
        weight ``formats`` and activation ranges per step group besides the all-steps one, for the groups the ascending
        timestep boundaries ``step_bounds`` cut (zeros until calibrated or loaded)."""
        self.wq = wq or WeightQuant()
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
        for name in self._quant_buffers:  # the previous layout (another format's bank would go stale)
            self._buffers.pop(name, None)
        widths = [int(b) for b in bits]
        self._bits: list[int] | None = widths
        self.formats = {f.name: f for f in (resolve(name) for name in formats)}
        banks = self._index_formats(widths)
        buffers = {
            "qbits": torch.tensor(list(bits), dtype=torch.int64, device=dev),
            **{name: torch.zeros(shape, dtype=dtype, device=dev) for name, (shape, dtype) in banks.items()},
            "a_scale": torch.zeros(n, parts, device=dev),
            "a_zero": torch.zeros(n, parts, device=dev),
            "a_range": torch.zeros(parts, 2, device=dev),
        }
        self.step_groups, self.a_group, self.a_step_observed, self._bounds = len(step_bounds) + 1, None, set(), None
        if self.step_groups > 1:
            g = self.step_groups
            buffers |= {
                "a_step_scale": torch.zeros(g, n, parts, device=dev),
                "a_step_zero": torch.zeros(g, n, parts, device=dev),
                "a_step_range": torch.zeros(g, parts, 2, device=dev),
                "a_step_bounds": torch.tensor([float(t) for t in step_bounds], dtype=torch.float32, device=dev),
            }
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self._quant_buffers = tuple(buffers)
        self.a_observed = False
        self.w_bits = self.a_bits = None
        self._wcache = {}

    def _index_formats(self, bits: Sequence[int]) -> ParamShapes:
        """Every weight candidate's format (``bits`` with ``wq``, then ``formats``) and where its parameters live;
        returns the bank buffers they need."""
        self.weight_formats = {f.key: f for f in (*(resolve(b, self.wq) for b in bits), *self.formats.values())}
        banks, self._slots = layout(list(self.weight_formats.values()), tuple(self.weight.shape), self.in_split)
        return banks

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
        return list(self.weight_formats)

    def weight_format(self, key: Key) -> Format:
        """The format of a calibrated weight candidate (a bit-width or a format's name), or of a data-free format
        (nothing to calibrate) named by its key."""
        fmt = self.weight_formats.get(key)
        if fmt is None and isinstance(key, str) and resolve(key).data_free:
            fmt = resolve(key)
        if fmt is None:
            raise KeyError(f"weight {key} was not calibrated (calibrated: {self.weight_keys})")
        return fmt

    def _act_index(self, bits: Key) -> int:
        for k, b in enumerate(self.bits):
            if b == bits:
                return k
        raise KeyError(f"activation bit-width {bits} was not calibrated (calibrated: {self.bits})")

    def _check(self, bits: Key, kind: str) -> None:
        """A KeyError unless ``bits`` was calibrated for ``kind`` (weight or activation)."""
        if kind == "weight":
            self.weight_format(bits)
        else:
            self._act_index(bits)

    def format_params(self, fmt: Format) -> dict[str, torch.Tensor]:
        """A weight candidate's calibrated parameters (views of its bank's buffers)."""
        return {} if fmt.data_free and fmt.key not in self._slots else self._slots[fmt.key].view(self._buffers)

    def _input_dim(self) -> int:
        return 1 if isinstance(self, nn.Conv2d) else -1

    # ------------------------------------------------------------------ calibration
    def calibrate_weight(self) -> None:
        """Every weight candidate's parameters from the weight (each bank filled once: every ``nf<k>`` shares one)."""
        for fmt in calibrators(list(self.weight_formats.values())):
            slot = self._slots[fmt.key]
            for param, t in fmt.calibrate(self.weight, self.in_split).items():
                buf = self._buffers[slot.bank + param]
                assert buf is not None
                (buf if slot.row is None else buf[slot.row]).copy_(t)
        self._wcache = {}

    def observe(self, x: torch.Tensor) -> None:
        if self.bos_aware and x.dim() == 3:
            x = x[:, 1:]
        g = self._group()
        if self.step_groups > 1 and g is None:
            raise MpqError(
                "step-grouped activation ranges are observed in denoiser calls (their timestep picks the group); "
                "call the denoiser, not the layer"
            )
        for p, part in enumerate(self._parts(x)):
            prev = (self.a_range[p, 0], self.a_range[p, 1]) if self.a_observed else None
            lo, hi = running_minmax(prev, part, self.momentum)
            self.a_range[p, 0], self.a_range[p, 1] = lo, hi
            if g is not None:
                r = self.a_step_range[g]
                lo, hi = running_minmax((r[p, 0], r[p, 1]) if g in self.a_step_observed else None, part, self.momentum)
                r[p, 0], r[p, 1] = lo, hi
        self.a_observed = True
        if g is not None:
            self.a_step_observed.add(g)

    def finalize_act(self) -> None:
        if not self.a_observed:
            raise RuntimeError("activation range not observed: the layer never ran during calibration")
        for k, b in enumerate(self.bits):
            for p in range(self.n_parts):
                self.a_scale[k, p], self.a_zero[k, p] = act_qparams(
                    self.a_range[p, 0], self.a_range[p, 1], b, self.a_symmetric
                )
                for g in self.a_step_observed:
                    self.a_step_scale[g, k, p], self.a_step_zero[g, k, p] = act_qparams(
                        self.a_step_range[g, p, 0], self.a_step_range[g, p, 1], b, self.a_symmetric
                    )

    # ------------------------------------------------------------------ activation of bits
    def set_bits(self, w_bits: Key | None, a_bits: int | None) -> None:
        for kind, b in (("weight", w_bits), ("activation", a_bits)):
            if b is not None:
                self._check(b, kind)
        self.w_bits, self.a_bits = w_bits, a_bits

    def set_multi(self, kind: str | None, bits: list[Key] | None = None) -> None:
        """Several candidate bits in one pass: the batch is ``len(bits)`` equal chunks, chunk k
        quantized (weights or input activations) at ``bits[k]``; ``kind=None`` ends it."""
        if kind is None or bits is None:
            self.multi = None
            return
        for b in bits:
            self._check(b, kind)
        self.multi = (kind, list(bits))

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_input(x, self.in_split, self._input_dim())

    def _fq_act(self, x: torch.Tensor, bits: int | None) -> torch.Tensor:
        if bits is None:
            return x
        k, (scale, zero) = self._act_index(bits), self._act_params()
        scale, zero = scale[k], zero[k]
        return fake_quant_input(x, self.in_split, self._input_dim(), scale, zero, bits, self.a_symmetric)

    def weight_at(self, bits: Key | None) -> torch.Tensor:
        """The weight fake-quantized at ``bits`` (or in the format it names; cached), or the float weight."""
        if bits is None:
            return self.weight
        if bits not in self._wcache:
            fmt = self.weight_format(bits)
            self._wcache[bits] = fmt.fake_quant(self.weight, self.format_params(fmt), self.in_split)
        return self._wcache[bits]

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _quant_forward(self, x: torch.Tensor, w_bits: Key | None, a_bits: int | None) -> torch.Tensor:
        bos = self.bos_aware and x.dim() == 3 and (w_bits is not None or a_bits is not None)
        if bos and w_bits is not None and not self.weight_format(w_bits).fp_bos_row:
            bos = False  # a runtime's own format computes every token with the quantized weight
        if bos:
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
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._wcache = {}
        self._bits = None  # re-read from the loaded qbits
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if self._quant_buffers and not self.qbits.is_meta:
            self._index_formats(self.bits)  # the loaded bit-widths are the weight candidates
        if self.step_groups > 1:
            self.a_step_observed = set(range(self.step_groups))

    def quant_state(self) -> dict[str, torch.Tensor]:
        """The quant buffers (the PTQ checkpoint's tensors): ``qbits``, every weight candidate's bank, ``a_*``."""
        return {k: t for k in self._quant_buffers if (t := self._buffers.get(k)) is not None}

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        formats = f", formats={list(self.formats)}" if self.formats else ""
        extra = f", bits={self.bits}{formats}, w_bits={self.w_bits}, a_bits={self.a_bits}, weight_quant={self.wq.label}"
        if self.n_parts > 1:
            extra += f", in_split={self.in_split}"
        if self.step_groups > 1:
            extra += f", step_groups={self.step_groups}"
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
