"""PackedLayer: a Linear/Conv2d of an exported model, its quantized weight kept packed in memory.

The weight is a uint8 buffer (``qweight``): the codes of the spec's weight
format as the format packs them (:class:`~mpq.quant.formats.base.Format`; the
checkpoint's integer widths 2-bit four a byte, 4-bit two a byte, 8-bit one a
byte, ``nf<k>`` base-k about log2(k) bits a code), with the format's
parameters as it names them in an export (the integer widths: fp32 scales,
and for asymmetric levels offsets, per row and group of input columns,
``w_scale`` / ``w_offset`` (rows, groups) in the layout of the spec's
``weight_quant``, :class:`~mpq.quant.quantizer.WeightQuant`; the named formats
``wf_*``); each call unpacks and decodes it (exactly as the fake-quant layer
computes it) and drops it again, so resident memory holds only the packed
bytes. A layer
whose weight stays FP keeps ``weight``. With activation bits, the input is
fake-quantized per part with ``a_scale``/``a_zero`` (n_parts,); with step groups (``step_groups`` G > 1,
:mod:`mpq.quant.steps`) with ``a_step_scale``/``a_step_zero`` (G, n_parts) of the group the denoiser's pre-hook
finds from the call's timestep (``a_step_bounds`` (G - 1,), kept fp32 by any cast), and the all-steps ones before
the first call.

A BOS-aware layer (cross-attention ``to_k``/``to_v``) computes the BOS token
with FP weights. The causal text encoders make that token's features the same
for every prompt, so export stores its input (``bos_in``) and FP output
(``bos_out``) instead of the FP weight; a row that differs from ``bos_in``
(e.g. an all-zero negative prompt: output = bias, exact either way) is
computed with the dequantized weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import MpqError
from mpq.quant.formats import Format, Key, resolve
from mpq.quant.formats.bitpack import MAX_BITS
from mpq.quant.layers import fake_quant_input
from mpq.quant.quantizer import WeightQuant
from mpq.quant.steps import StepRanges

# a packed layer's activation (all steps; per step group) and BOS tensors (fp32)
ACT_TENSORS = ("a_scale", "a_zero", "a_step_scale", "a_step_zero", "a_step_bounds", "bos_in", "bos_out")
NON_WEIGHT = ("bias", *ACT_TENSORS)  # what an exported layer stores besides its weight (codes and parameters)


@dataclass(frozen=True)
class PackedSpec:
    """What a :class:`PackedLayer` needs besides its tensors (stored in the denoiser's ``quantization_config``)."""

    kind: str  # linear | conv
    shape: tuple[int, ...]  # weight shape
    w_bits: Key | None  # bits of the weight quantizer ``weight_quant``, or a weight format (``nf12``)
    a_bits: int | None
    in_split: tuple[int, ...]
    bos_aware: bool = False
    bos_cached: bool = False
    a_symmetric: bool = False
    bias: bool = True
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups
    weight_quant: dict[str, Any] = field(default_factory=dict)  # WeightQuant fields ({}: MixDQ's per-channel)
    step_groups: int = 1  # activation ranges per group of sampling steps (quantized activations only)

    @property
    def wq(self) -> WeightQuant:
        return WeightQuant(**self.weight_quant)

    @property
    def format(self) -> Format:
        """The weight's format (``w_bits`` a width: the integer quantizer ``weight_quant``); the weight is quantized."""
        if self.w_bits is None:
            raise ValueError("an FP weight has no format")
        return resolve(self.w_bits, self.wq)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["in_split"] = list(self.shape), list(self.in_split)
        if self.step_groups == 1:
            del d["step_groups"]  # one range for all steps: the spec as before step groups
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "layer spec") -> PackedSpec:
        """A spec read from an export, every field checked against what the format can store (one-line errors)."""
        fix = "restore it or re-export with `mpq export`"
        if not isinstance(d, dict):
            raise MpqError(f"{where}: not a mapping; {fix}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MpqError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(known))}); {fix}")
        missing = sorted({"kind", "shape", "w_bits", "a_bits", "in_split"} - set(d))
        if missing:
            raise MpqError(f"{where}: field '{missing[0]}' is missing; {fix}")

        def bad(key: str, why: str) -> MpqError:
            return MpqError(f"{where}: field '{key}' is {d.get(key)!r}; {why}; {fix}")

        if d["kind"] not in ("linear", "conv"):
            raise bad("kind", "it must be linear or conv")
        shape = d["shape"]
        if not (
            isinstance(shape, list)
            and len(shape) == (2 if d["kind"] == "linear" else 4)
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)
        ):
            raise bad("shape", "it must be the weight's positive dimensions (2 for linear, 4 for conv)")
        w, a = d["w_bits"], d["a_bits"]
        if w is not None:
            kind = f"it must be null (FP), an integer 1..{MAX_BITS} or a weight format"
            if isinstance(w, bool) or not isinstance(w, int | str):
                raise bad("w_bits", kind)
            try:
                fmt = resolve(w)
                fmt.packed_bytes(1)  # a width the packer stores
            except (MpqError, ValueError) as err:
                raise bad("w_bits", f"{kind} ({err})") from None
            if fmt.key != w:
                raise bad("w_bits", f"not a weight format (not the canonical name {fmt.key!r})")
        if a is not None and not (isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= MAX_BITS):
            raise bad("a_bits", f"it must be null (FP) or an integer 1..{MAX_BITS}")
        split = d["in_split"]
        if not (
            isinstance(split, list)
            and len(split) >= 2
            and split[0] == 0
            and split[-1] == shape[1]
            and all(isinstance(x, int) for x in split)
            and split == sorted(set(split))
        ):
            raise bad("in_split", f"it must rise from 0 to the input channels ({shape[1]})")
        for key in ("bos_aware", "bos_cached", "a_symmetric", "bias"):
            if key in d and not isinstance(d[key], bool):
                raise bad(key, "it must be true or false")
        groups = d.get("step_groups", 1)
        if not (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1):
            raise bad("step_groups", "it must be a positive integer")
        if groups > 1 and a is None:
            raise bad("step_groups", "only a layer with activation bits has step groups")
        if d["kind"] == "conv":
            conv = d.get("conv")
            keys = {"stride", "padding", "dilation", "groups"}
            if not isinstance(conv, dict) or set(conv) != keys:
                raise bad("conv", f"a conv layer needs {', '.join(sorted(keys))}")
        wq = d.get("weight_quant", {})
        try:
            WeightQuant(**wq)
        except (TypeError, ValueError) as err:
            raise bad("weight_quant", f"not a weight quantizer ({err})") from None
        return cls(**{**d, "shape": tuple(shape), "in_split": tuple(split)})


class PackedLayer(StepRanges, nn.Module):
    def __init__(self, spec: PackedSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        s, parts = spec.shape, len(spec.in_split) - 1
        if spec.kind == "linear":  # the attributes pipelines read off Linear/Conv2d
            self.in_features, self.out_features = s[1], s[0]
        else:
            self.in_channels, self.out_channels, self.kernel_size = s[1] * spec.conv["groups"], s[0], tuple(s[2:])
            self.stride, self.padding = tuple(spec.conv["stride"]), tuple(spec.conv["padding"])
            self.dilation, self.groups = tuple(spec.conv["dilation"]), spec.conv["groups"]
        f32 = {"device": device, "dtype": torch.float32}
        self.param_names: tuple[str, ...] = ()  # the weight format's parameters, as the export names them
        if spec.w_bits is None:
            self.weight = nn.Parameter(torch.empty(s, **f32), requires_grad=False)
        else:
            fmt = spec.format
            self.register_buffer(
                "qweight", torch.empty(fmt.packed_bytes(math.prod(s)), dtype=torch.uint8, device=device)
            )
            shapes = fmt.export_shapes(s, spec.in_split)
            for name, (pshape, dtype) in shapes.items():
                self.register_buffer(name, torch.empty(pshape, dtype=dtype, device=device))
            self.param_names = tuple(shapes)
            if spec.bos_cached:
                self.register_buffer("bos_in", torch.empty(s[1], **f32))
                self.register_buffer("bos_out", torch.empty(s[0], **f32))
        self.bias = nn.Parameter(torch.empty(s[0], **f32), requires_grad=False) if spec.bias else None
        if spec.a_bits is not None:
            self.register_buffer("a_scale", torch.empty(parts, **f32))
            self.register_buffer("a_zero", torch.empty(parts, **f32))
        self.a_group: int | None = None  # the step group of the latest denoiser call (set by its pre-hook)
        if spec.a_bits is not None and spec.step_groups > 1:
            self.register_buffer("a_step_scale", torch.empty(spec.step_groups, parts, **f32))
            self.register_buffer("a_step_zero", torch.empty(spec.step_groups, parts, **f32))
            self.register_buffer("a_step_bounds", torch.empty(spec.step_groups - 1, **f32))

    @property
    def step_groups(self) -> int:
        return self.spec.step_groups if self.spec.a_bits is not None else 1

    @property
    def keep_fp32(self) -> frozenset[str]:
        """The tensors a dtype cast leaves fp32: the format's parameters, activation and BOS tensors."""
        return frozenset((*self.param_names, *ACT_TENSORS))

    # ------------------------------------------------------------------ compute
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The FP weight, or the dequantized one (made on each access, for code that reads ``.weight``)."""
        if "weight" in self._parameters:
            return self._parameters["weight"]  # type: ignore[return-value]
        return self.dequantized_weight(self.bias.dtype if self.bias is not None else torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the fake-quant layer computes it (unpacked now, not kept)."""
        spec = self.spec
        if spec.w_bits is None:
            return self._parameters["weight"]  # type: ignore[return-value]
        fmt = spec.format
        stored = {k: t for k in self.param_names if (t := self._buffers.get(k)) is not None}
        codes = fmt.unpack(self.qweight, math.prod(spec.shape)).reshape(spec.shape)
        return fmt.decode(codes, fmt.import_params(stored), spec.shape, spec.in_split).to(dtype)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "linear":
            return F.linear(x, w, self.bias)
        c = self.spec.conv
        return F.conv2d(x, w, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.a_bits is None:
            return x
        dim = -1 if self.spec.kind == "linear" else 1
        scale, zero = self._act_params()
        return fake_quant_input(x, self.spec.in_split, dim, scale, zero, self.spec.a_bits, self.spec.a_symmetric)

    def _bos_head(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.spec.w_bits is None:
            return self._op(x, self.weight)
        if not self.spec.bos_cached:
            return self._op(x, w)
        match = (x[:, 0] == self.bos_in.to(x.dtype)).all(dim=-1)
        out = self.bos_out.to(x.dtype).expand(x.shape[0], 1, -1).clone()
        if not bool(match.all()):
            out[~match] = self._op(x[~match], w)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        if self.spec.bos_aware and x.dim() == 3:
            return torch.cat([self._bos_head(x[:, :1], w), self._op(self._act(x[:, 1:]), w)], dim=1)
        return self._op(self._act(x), w)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.kind}, shape={list(s.shape)}, w_bits={s.w_bits}, a_bits={s.a_bits}"
            + (f", in_split={list(s.in_split)}" if len(s.in_split) > 2 else "")
            + (f", step_groups={self.step_groups}" if self.step_groups > 1 else "")
        )
