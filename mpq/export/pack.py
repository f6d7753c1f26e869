"""Signed b-bit integers packed into bytes, and back: :mod:`mpq.quant.formats.bitpack` (the integer formats' codes)."""

from mpq.quant.formats.bitpack import DENSE, MAX_BITS, pack, packed_numel, unpack

__all__ = ["DENSE", "MAX_BITS", "pack", "packed_numel", "unpack"]
