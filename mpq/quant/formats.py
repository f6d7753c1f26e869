"""Weight formats: the weight candidates besides the checkpoint's integer bit-widths (pure functions on tensors).

A weight candidate is a *key*: an ``int`` is the checkpoint's integer quantizer (``quant.weight``) at that
width, exactly as MixDQ's files mean it; a ``str`` names a :class:`Format` (``quant.weight_formats``):

* ``nf<k>``, k in 7, 12, 16, 24, 32: a NormalFloat codebook of k levels. The weight is read flat (memory
  order) in blocks of 64 elements; a block's values are divided by its scale and rounded to the nearest
  level. The scale is a uint8 ratio (ceil, so nothing clips) of the block's absolute maximum to its
  super-block's fp32 absolute maximum (256 blocks = 16,384 elements). Storage: the codes packed base-k
  (:func:`pack_base`, about log2(k) bits a code), one byte a block, four bytes a super-block: log2(k) + 0.127
  bits a weight. All k share one set of block scales (they depend on the weight only).
* ``fp8``: float8 e4m3 codes with an fp32 scale per output channel (absolute maximum / 448).
* ``int<b>-<sym|asym>-<tensor|channel|kernel|g<N>>``: the integer grid with its own level set and scale
  granularity (:class:`~mpq.quant.quantizer.WeightQuant`), beside the checkpoint's: ``int4-asym-g64`` is a
  block-64 int4 next to a per-channel one.

Levels of ``nf<k>``: the normal quantiles at the k equal-probability points (i + 1/2) / k, divided by the
largest: symmetric, in [-1, 1], zero included when k is odd.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from mpq.errors import MpqError
from mpq.quant.quantizer import (
    EPS,
    WeightQuant,
    dequantize_codes,
    expand_params,
    grouped_codes,
    grouped_qparams,
)

Key = int | str
NF_LEVELS = (7, 12, 16, 24, 32)
NF_BLOCK = 64
NF_SUPER_BLOCKS = 256  # blocks per super-block: 16,384 elements, as the seed; see the README for why
FP8_MAX = 448.0
KNOWN = (
    "integer bits 2..8, "
    + "|".join(f"nf{k}" for k in NF_LEVELS)
    + ", fp8, int<b>-<sym|asym>-<tensor|channel|kernel|g<N>>"
)

Params = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- NormalFloat levels
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


# ----------------------------------------------------------------------------- base-k packing
def base_word(k: int) -> tuple[int, int]:
    """(codes a word, bits a word): the most base-``k`` digits whose word fits 62 bits, and its bit length."""
    n = 1
    while k ** (n + 1) <= 2**62:
        n += 1
    return n, (k**n - 1).bit_length()


def packed_base_bytes(numel: int, k: int) -> int:
    n, b = base_word(k)
    return -(-(-(-numel // n) * b) // 8)


def pack_base(codes: torch.Tensor, k: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Codes in [0, k) (any shape) -> flat uint8: ``n`` codes a word (``c_0 + c_1 k + ...``), each word written
    with ``b`` bits into a little-endian bit stream (:func:`base_word`): 22 codes of k = 7 in 62 bits."""
    n, b = base_word(k)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= k):
        raise ValueError(f"codes outside [0, {k})")
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % n)]).reshape(-1, n)
    powers = torch.tensor([k**j for j in range(n)], dtype=torch.int64, device=flat.device)
    words = (flat * powers).sum(dim=1)
    shifts = torch.arange(b, dtype=torch.int64, device=flat.device)
    out = []
    for w in words.split(chunk):  # bounded memory: a chunk's bits at a time (chunk * b is a multiple of 8)
        out.append(((w.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8))
    bits = torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8, device=flat.device)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).reshape(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_base(packed: torch.Tensor, k: int, numel: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Flat uint8 from :func:`pack_base` -> the first ``numel`` codes (int64, flat)."""
    n, b = base_word(k)
    n_words = -(-numel // n)
    dev = packed.device
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    shifts = torch.arange(b, dtype=torch.int64, device=dev)
    powers = torch.tensor([k**j for j in range(n)], dtype=torch.int64, device=dev)
    out = []
    for w0 in range(0, n_words, chunk):  # a chunk of words at a time: ``chunk * b`` bits (whole bytes) each
        w1 = min(w0 + chunk, n_words)
        raw = packed[w0 * b // 8 : -(-w1 * b // 8)]
        bits = ((raw.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: (w1 - w0) * b].to(torch.int64)
        words = (bits.reshape(w1 - w0, b) << shifts).sum(dim=1)
        out.append(((words.unsqueeze(1) // powers) % k).reshape(-1))
    codes = torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=dev)
    return codes[:numel]


# ----------------------------------------------------------------------------- formats
class Format:
    """A weight format: a name, its calibrated parameters, codes, storage. ``slug`` names its parameter buffers
    (formats with one slug share them: every ``nf<k>``)."""

    name: str
    slug: str
    nominal_bits: float  # the code bits a weight (average-bits accounting; scales are priced in bytes)

    def param_shapes(
        self, shape: Sequence[int], in_split: Sequence[int]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        raise NotImplementedError

    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        """Codes back to the float32 weight: the one formula fake quant and the packed export share."""
        raise NotImplementedError

    def fake_quant(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        return self.decode(self.codes(w, p, in_split), p, tuple(w.shape), in_split).to(w.dtype)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        raise NotImplementedError

    def packed_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        """Bytes of the stored parameters (the cost model's ``scale_bytes`` a float scale or offset)."""
        raise NotImplementedError

    def stored_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int = 2) -> float:
        return float(self.packed_bytes(math.prod(shape)) + self.param_bytes(shape, in_split, scale_bytes))


@dataclass(frozen=True)
class NFFormat(Format):
    k: int

    def __post_init__(self) -> None:
        nf_levels(self.k)  # checks k

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nf{self.k}"

    slug = "nf"

    @property
    def nominal_bits(self) -> float:  # type: ignore[override]
        return math.log2(self.k)

    @staticmethod
    def layout(numel: int) -> tuple[int, int]:
        blocks = -(-numel // NF_BLOCK)
        return blocks, -(-blocks // NF_SUPER_BLOCKS)

    def param_shapes(self, shape, in_split):  # type: ignore[no-untyped-def]
        blocks, supers = self.layout(math.prod(shape))
        return {"ratio": ((blocks,), torch.uint8), "smax": ((supers,), torch.float32)}

    def calibrate(self, w, in_split):  # type: ignore[no-untyped-def]
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

    def codes(self, w, p, in_split):  # type: ignore[no-untyped-def]
        flat = w.detach().float().reshape(-1)
        levels = nf_levels(self.k).to(flat.device)
        x = flat / self.block_scale(p, flat.numel()).to(flat.device)
        return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2.0).reshape(w.shape)

    def decode(self, codes, p, shape, in_split):  # type: ignore[no-untyped-def]
        flat = codes.reshape(-1).long()
        levels = nf_levels(self.k).to(flat.device)
        return (levels[flat] * self.block_scale(p, flat.numel()).to(flat.device)).reshape(tuple(shape))

    def pack(self, codes):  # type: ignore[no-untyped-def]
        return pack_base(codes, self.k)

    def unpack(self, packed, numel):  # type: ignore[no-untyped-def]
        return unpack_base(packed, self.k, numel)

    def packed_bytes(self, numel):  # type: ignore[no-untyped-def]
        return packed_base_bytes(numel, self.k)

    def param_bytes(self, shape, in_split, scale_bytes):  # type: ignore[no-untyped-def]
        blocks, supers = self.layout(math.prod(shape))
        return float(blocks + 4 * supers)  # uint8 ratios, fp32 super-block maxima (the format's own, not scale_bytes)


@dataclass(frozen=True)
class FP8Format(Format):
    name = "fp8"  # type: ignore[assignment]
    slug = "fp8"
    nominal_bits = 8.0  # type: ignore[assignment]

    def param_shapes(self, shape, in_split):  # type: ignore[no-untyped-def]
        return {"scale": ((int(shape[0]),), torch.float32)}

    def calibrate(self, w, in_split):  # type: ignore[no-untyped-def]
        amax = w.detach().float().reshape(w.shape[0], -1).abs().amax(dim=1)
        return {"scale": (amax / FP8_MAX).clamp(min=EPS)}

    def _scale(self, p: Params, shape: Sequence[int]) -> torch.Tensor:
        return p["scale"].float().reshape((-1,) + (1,) * (len(shape) - 1))

    def codes(self, w, p, in_split):  # type: ignore[no-untyped-def]
        x = (w.detach().float() / self._scale(p, w.shape).to(w.device)).clamp(-FP8_MAX, FP8_MAX)
        return x.to(torch.float8_e4m3fn).view(torch.uint8)

    def decode(self, codes, p, shape, in_split):  # type: ignore[no-untyped-def]
        x = codes.reshape(tuple(shape)).to(torch.uint8).view(torch.float8_e4m3fn).float()
        return x * self._scale(p, shape).to(x.device)

    def pack(self, codes):  # type: ignore[no-untyped-def]
        return codes.reshape(-1).to(torch.uint8)

    def unpack(self, packed, numel):  # type: ignore[no-untyped-def]
        return packed[:numel]

    def packed_bytes(self, numel):  # type: ignore[no-untyped-def]
        return int(numel)

    def param_bytes(self, shape, in_split, scale_bytes):  # type: ignore[no-untyped-def]
        return float(int(shape[0]) * scale_bytes)


@dataclass(frozen=True)
class IntFormat(Format):
    bits: int
    wq: WeightQuant

    @property
    def name(self) -> str:  # type: ignore[override]
        g = f"g{self.wq.group_size}" if self.wq.granularity == "group" else self.wq.granularity
        return f"int{self.bits}-{'asym' if self.wq.asymmetric else 'sym'}-{g}"

    @property
    def slug(self) -> str:  # type: ignore[override]
        return self.name.replace("-", "_")

    @property
    def nominal_bits(self) -> float:  # type: ignore[override]
        return float(self.bits)

    def param_shapes(self, shape, in_split):  # type: ignore[no-untyped-def]
        rows, groups = self.wq.rows(shape), self.wq.n_groups(shape, in_split)
        out = {"scale": ((rows, groups), torch.float32)}
        if self.wq.asymmetric:  # symmetric levels store no offset (as the integer quantizer's export)
            out["offset"] = ((rows, groups), torch.float32)
        return out

    def calibrate(self, w, in_split):  # type: ignore[no-untyped-def]
        scale, offset = grouped_qparams(w, [self.bits], self.wq, in_split)[self.bits]
        return {"scale": scale, "offset": offset} if self.wq.asymmetric else {"scale": scale}

    def _expanded(self, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self.wq.column_groups(tuple(shape), tuple(in_split))
        scale = expand_params(p["scale"].float(), groups, shape)
        offset = expand_params(p["offset"].float(), groups, shape) if "offset" in p else torch.zeros_like(scale)
        return scale, offset

    def codes(self, w, p, in_split):  # type: ignore[no-untyped-def]
        scale, offset = self._expanded(p, w.shape, in_split)
        q = grouped_codes(w.detach(), scale.to(w.device), offset.to(w.device), self.bits, self.wq.asymmetric)
        return (q - 2 ** (self.bits - 1) if self.wq.asymmetric else q).to(torch.int16)  # signed, as the packer takes

    def decode(self, codes, p, shape, in_split):  # type: ignore[no-untyped-def]
        scale, offset = self._expanded(p, shape, in_split)
        q = codes.reshape(tuple(shape)).float()
        if self.wq.asymmetric:
            q = q + 2 ** (self.bits - 1)
        return dequantize_codes(q, scale.to(q.device), offset.to(q.device), self.wq.asymmetric)

    def pack(self, codes):  # type: ignore[no-untyped-def]
        from mpq.export.pack import pack

        return pack(codes, self.bits)

    def unpack(self, packed, numel):  # type: ignore[no-untyped-def]
        from mpq.export.pack import unpack

        return unpack(packed, self.bits, numel)

    def packed_bytes(self, numel):  # type: ignore[no-untyped-def]
        return -(-numel * self.bits // 8)

    def param_bytes(self, shape, in_split, scale_bytes):  # type: ignore[no-untyped-def]
        return float(self.wq.n_params(shape, in_split) * scale_bytes)


# ----------------------------------------------------------------------------- names and keys
_INT = re.compile(r"int([2-8])-(sym|asym)-(tensor|channel|kernel|g([1-9]\d*))")


@cache
def parse_format(name: str) -> Format:
    """The format a name stands for; an unknown name or level count is a one-line error naming the choices."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"nf(\d+)", text)
    if m:
        k = int(m.group(1))
        if k not in NF_LEVELS:
            raise MpqError(f"weight format {name!r}: unsupported level count {k}; choose one of {KNOWN}")
        return NFFormat(k)
    if text in ("fp8", "fp8-e4m3", "e4m3"):
        return FP8Format()
    m = _INT.fullmatch(text)
    if m:
        bits, levels, gran, size = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        wq = WeightQuant(
            "asymmetric" if levels == "asym" else "symmetric",
            "group" if size else gran,
            int(size) if size else 64,
        )
        return IntFormat(bits, wq)
    raise MpqError(f"unknown weight format {name!r}; choose one of {KNOWN}")


def weight_key(value: object) -> Key:
    """A weight candidate as plans hold it: an int (the checkpoint's integer quantizer) or a format's name."""
    if isinstance(value, bool):
        raise MpqError(f"weight format {value!r}: give bits (2..8) or a format name ({KNOWN})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    return parse_format(text).name


def nominal_bits(key: Key) -> float:
    """The code bits a weight of ``key`` (what average bits count): the width of an int, log2(k) of ``nf<k>``."""
    return float(key) if isinstance(key, int) else parse_format(key).nominal_bits
