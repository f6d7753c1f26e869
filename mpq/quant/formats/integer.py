"""Integer grids: the checkpoint's integer quantizer and the named integer variants.

* :class:`CheckpointInt`: the checkpoint's integer quantizer (``quant.weight``) at a width, keyed by the width (the
  ``int`` of a plan: what MixDQ's files mean by an integer);
* :class:`IntFormat`: ``int<b>-<sym|asym>-<tensor|channel|kernel|g<N>>``, the grid with its own level set and scale
  granularity (:class:`~mpq.quant.quantizer.WeightQuant`), beside the checkpoint's: ``int4-asym-g64`` is a block-64
  int4 next to a per-channel one.

Both compute as :mod:`mpq.quant.quantizer` says; codes are signed (asymmetric levels [0, 2^b - 1] stored minus
2^(b-1)), packed ``b`` bits each (:mod:`mpq.quant.formats.bitpack`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from mpq.quant.formats.base import BITS_KEY, Format, IntGrid, Key, Params, ParamShapes
from mpq.quant.formats.bitpack import pack, packed_numel, unpack
from mpq.quant.quantizer import (
    WeightQuant,
    dequantize_codes,
    expand_params,
    grouped_codes,
    grouped_fake_quant,
    grouped_qparams,
)

CHOICES = "int<b>-<sym|asym>-<tensor|channel|kernel|g<N>>"
_NAME = re.compile(r"int([2-8])-(sym|asym)-(tensor|channel|kernel|g([1-9]\d*))")


@lru_cache(maxsize=4096)
def column_groups(wq: WeightQuant, shape: tuple[int, ...], in_split: tuple[int, ...]) -> torch.Tensor:
    """The group of every input column (cached, on the CPU: read it, never write it)."""
    return wq.column_groups(shape, in_split)


@dataclass(frozen=True)
class IntFormat(Format):
    bits: int
    wq: WeightQuant

    choices = CHOICES

    @classmethod
    def from_name(cls, name: str) -> IntFormat | None:
        m = _NAME.fullmatch(name)
        if not m:
            return None
        bits, levels, gran, size = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        wq = WeightQuant(
            "asymmetric" if levels == "asym" else "symmetric",
            "group" if size else gran,
            int(size) if size else 64,
        )
        return cls(bits, wq)

    @property
    def name(self) -> str:
        g = f"g{self.wq.group_size}" if self.wq.granularity == "group" else self.wq.granularity
        return f"int{self.bits}-{'asym' if self.wq.asymmetric else 'sym'}-{g}"

    @property
    def nominal_bits(self) -> float:
        return float(self.bits)

    @property
    def bank(self) -> str:
        return f"wf_{self.name.replace('-', '_')}_"

    @property
    def grid(self) -> IntGrid | None:
        return IntGrid(self.bits, self.wq, f"plan int{self.bits}-sym-channel")

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        rows, groups = self.wq.rows(shape), self.wq.n_groups(shape, in_split)
        out: ParamShapes = {"scale": ((rows, groups), torch.float32)}
        if self.wq.asymmetric:  # symmetric levels store no offset
            out["offset"] = ((rows, groups), torch.float32)
        return out

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        scale, offset = grouped_qparams(w, [self.bits], self.wq, in_split)[self.bits]
        return {"scale": scale, "offset": offset} if self.wq.asymmetric else {"scale": scale}

    def _expanded(self, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) spread over a weight of ``shape`` (offset zero when not stored), float32."""
        groups = column_groups(self.wq, tuple(shape), tuple(in_split))
        scale = expand_params(p["scale"].float(), groups, shape)
        offset = expand_params(p["offset"].float(), groups, shape) if "offset" in p else torch.zeros_like(scale)
        return scale, offset

    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        scale, offset = self._expanded(p, w.shape, in_split)
        q = grouped_codes(w.detach(), scale.to(w.device), offset.to(w.device), self.bits, self.wq.asymmetric)
        return (q - 2 ** (self.bits - 1) if self.wq.asymmetric else q).to(torch.int16)  # signed, as the packer takes

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        scale, offset = self._expanded(p, shape, in_split)
        q = codes.reshape(tuple(shape)).float()
        if self.wq.asymmetric:
            q = q + 2 ** (self.bits - 1)
        return dequantize_codes(q, scale.to(q.device), offset.to(q.device), self.wq.asymmetric)

    def fake_quant(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        """``decode(codes(w))`` in one pass (no integer codes made): the same numbers, half the work."""
        scale, offset = self._expanded(p, w.shape, in_split)
        return grouped_fake_quant(w.detach(), scale.to(w.device), offset.to(w.device), self.bits, self.wq.asymmetric)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack(codes, self.bits)

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        return unpack(packed, self.bits, numel)

    def packed_bytes(self, numel: int) -> int:
        return packed_numel(numel, self.bits)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        return float(self.wq.n_params(shape, in_split) * scale_bytes)


@dataclass(frozen=True)
class CheckpointInt(IntFormat):
    """The checkpoint's integer quantizer (``quant.weight``; MixDQ's symmetric per-channel one by default) at
    ``bits``, keyed by ``bits``. In a layer its parameters are one row of the banks ``w_scale`` / ``w_offset``
    (widths, rows, groups) that every width of the checkpoint shares (``offset`` kept, zero, when symmetric: the
    checkpoint's layout); an export stores ``w_scale`` (and ``w_offset`` when asymmetric). Its parameters compute
    in their own dtype (a layer cast to float64 dequantizes in float64)."""

    stacked = True
    config_key = BITS_KEY

    @property
    def name(self) -> str:
        return str(self.bits)

    @property
    def key(self) -> Key:
        return self.bits

    @property
    def bank(self) -> str:
        return "w_"

    @property
    def export_prefix(self) -> str:
        return "w_"

    @property
    def torchao_w8a8(self) -> bool:
        return self.bits == 8

    @property
    def grid(self) -> IntGrid | None:
        return IntGrid(
            self.bits, self.wq, "calibrate with quant.weight.levels=symmetric quant.weight.granularity=channel"
        )

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        rows, groups = self.wq.rows(shape), self.wq.n_groups(shape, in_split)
        return {"scale": ((rows, groups), torch.float32), "offset": ((rows, groups), torch.float32)}

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        scale, offset = grouped_qparams(w, [self.bits], self.wq, in_split)[self.bits]
        return {"scale": scale, "offset": offset}

    def _expanded(self, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        groups = column_groups(self.wq, tuple(shape), tuple(in_split))
        scale = expand_params(p["scale"], groups, shape)
        offset = expand_params(p["offset"], groups, shape) if "offset" in p else torch.zeros_like(scale)
        return scale, offset

    def export_params(self, p: Params) -> Params:
        return super().export_params(p if self.wq.asymmetric else {k: t for k, t in p.items() if k != "offset"})
