"""Pack signed b-bit integers into bytes, and back (pure functions): the integer grids' codes.

A symmetric b-bit weight ``q`` in [-2^(b-1), 2^(b-1) - 1] is stored as the
unsigned ``q + 2^(b-1)`` in a little-endian bit stream: value i occupies bits
``b*i .. b*i + b - 1``, so ``numel`` values take exactly ``ceil(numel * b / 8)``
bytes at every width 1..8 (2-bit: four a byte, 4-bit: two a byte, 3-bit: eight
in three bytes) -- the bytes the cost model prices.
"""

from __future__ import annotations

import torch

MAX_BITS = 8
DENSE = (1, 2, 4, 8)  # widths whose values never straddle a byte


def _check(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{bits}-bit integers cannot be packed into bytes (1..{MAX_BITS} bits)")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` values at ``bits``: ``ceil(numel * bits / 8)``."""
    _check(bits)
    return -(-numel * bits // 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers ``q`` (any shape, values in the symmetric ``bits`` range) -> flat uint8."""
    _check(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    u = (flat + 2 ** (bits - 1)).to(torch.int64)
    n_bytes = packed_numel(u.numel(), bits)
    if bits in DENSE:  # ``8 // bits`` values a byte
        per = 8 // bits
        u = torch.cat([u, u.new_zeros((-u.numel()) % per)]).reshape(-1, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.int64, device=u.device)
        return (u << shifts).sum(dim=1).to(torch.uint8)[:n_bytes]
    # 3/5/6/7 bits: eight values fill ``bits`` bytes exactly
    u = torch.cat([u, u.new_zeros((-u.numel()) % 8)]).reshape(-1, 8)
    word = (u << torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=u.device)).sum(dim=1)  # < 2^56
    out = (word.unsqueeze(1) >> torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=u.device)) & 0xFF
    return out.reshape(-1).to(torch.uint8)[:n_bytes]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Flat uint8 from :func:`pack` -> the first ``numel`` signed integers (int8, flat)."""
    _check(bits)
    if bits in DENSE:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        u = ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    else:
        b = packed.to(torch.int64)
        b = torch.cat([b, b.new_zeros((-b.numel()) % bits)]).reshape(-1, bits)
        word = (b << torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=b.device)).sum(dim=1)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=b.device)
        u = ((word.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    return (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
