"""``nf<k>``, k in 7, 12, 16, 24, 32: a NormalFloat codebook of k levels.

The weight is read flat (memory order) in blocks of 64 elements; a block's values are divided by its scale and
rounded to the nearest level. The scale is a uint8 ratio (ceil, so nothing clips) of the block's absolute maximum to
its super-block's fp32 absolute maximum (256 blocks = 16,384 elements). Storage: the codes packed base-k
(:func:`~mpq.quant.formats.basek.pack_base`, about log2(k) bits a code), one byte a block, four bytes a super-block:
log2(k) + 0.127 bits a weight. All k share one set of block scales (they depend on the weight only: one bank).

Levels: the normal quantiles at the k equal-probability points (i + 1/2) / k, divided by the largest: symmetric, in
[-1, 1], zero included when k is odd.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from mpq.errors import MpqError
from mpq.quant.formats.base import Format, Params, ParamShapes
from mpq.quant.formats.basek import pack_base, packed_base_bytes, unpack_base
from mpq.quant.quantizer import EPS

NF_LEVELS = (7, 12, 16, 24, 32)
NF_BLOCK = 64
NF_SUPER_BLOCKS = 256  # blocks per super-block: 16,384 elements, as the seed; see the README for why
CHOICES = "|".join(f"nf{k}" for k in NF_LEVELS)


@cache
def _nf_levels(k: int) -> tuple[float, ...]:
    p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    q = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
    q = q / q.abs().max()
    q = (q - q.flip(0)) / 2.0  # exactly symmetric
    return tuple(float(v) for v in q)


def nf_levels(k: int) -> torch.Tensor:
    """The k NormalFloat levels (float32, increasing, symmetric, the outermost at -1 and 1)."""
    if k not in NF_LEVELS:
        raise MpqError(f"nf{k}: unsupported level count {k}; choose one of {', '.join(f'nf{n}' for n in NF_LEVELS)}")
    return torch.tensor(_nf_levels(k), dtype=torch.float32)


@dataclass(frozen=True)
class NFFormat(Format):
    k: int

    choices = CHOICES

    def __post_init__(self) -> None:
        nf_levels(self.k)  # checks k

    @classmethod
    def from_name(cls, name: str) -> NFFormat | None:
        m = re.fullmatch(r"nf(\d+)", name)
        if not m:
            return None
        if int(m.group(1)) not in NF_LEVELS:
            raise MpqError(f"unsupported level count {m.group(1)}")
        return cls(int(m.group(1)))

    @property
    def name(self) -> str:
        return f"nf{self.k}"

    @property
    def nominal_bits(self) -> float:
        return math.log2(self.k)

    @property
    def bank(self) -> str:
        return "wf_nf_"

    @staticmethod
    def layout(numel: int) -> tuple[int, int]:
        """(blocks, super-blocks) of ``numel`` elements."""
        blocks = -(-numel // NF_BLOCK)
        return blocks, -(-blocks // NF_SUPER_BLOCKS)

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        blocks, supers = self.layout(math.prod(shape))
        return {"ratio": ((blocks,), torch.uint8), "smax": ((supers,), torch.float32)}

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        flat = w.detach().float().reshape(-1)
        blocks, supers = self.layout(flat.numel())
        bmax = torch.cat([flat.abs(), flat.new_zeros(blocks * NF_BLOCK - flat.numel())]).reshape(blocks, NF_BLOCK)
        bmax = bmax.amax(dim=1)
        padded = torch.cat([bmax, bmax.new_zeros(supers * NF_SUPER_BLOCKS - blocks)])
        smax = padded.reshape(supers, NF_SUPER_BLOCKS).amax(dim=1).clamp(min=EPS)
        ratio = torch.ceil(bmax / smax.repeat_interleave(NF_SUPER_BLOCKS)[:blocks] * 255.0).clamp(1, 255)
        return {"ratio": ratio.to(torch.uint8), "smax": smax}

    @staticmethod
    def block_scale(p: Params, numel: int) -> torch.Tensor:
        """Every element's scale (flat, float32): ratio / 255 x its super-block's maximum."""
        ratio, smax = p["ratio"], p["smax"].float()
        per_block = ratio.float() / 255.0 * smax.repeat_interleave(NF_SUPER_BLOCKS)[: ratio.numel()]
        return per_block.repeat_interleave(NF_BLOCK)[:numel]

    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        flat = w.detach().float().reshape(-1)
        levels = nf_levels(self.k).to(flat.device)
        x = flat / self.block_scale(p, flat.numel()).to(flat.device)
        return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2.0).reshape(w.shape)

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        flat = codes.reshape(-1).long()
        levels = nf_levels(self.k).to(flat.device)
        return (levels[flat] * self.block_scale(p, flat.numel()).to(flat.device)).reshape(tuple(shape))

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_base(codes, self.k)

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        return unpack_base(packed, self.k, numel)

    def packed_bytes(self, numel: int) -> int:
        return packed_base_bytes(numel, self.k)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        blocks, supers = self.layout(math.prod(shape))
        return float(blocks + 4 * supers)  # uint8 ratios, fp32 super-block maxima (the format's own, not scale_bytes)
