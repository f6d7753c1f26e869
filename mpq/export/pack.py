"""Pack signed b-bit integers into bytes, and back (pure functions).

A symmetric b-bit weight ``q`` in [-2^(b-1), 2^(b-1) - 1] is stored as the
unsigned ``q + 2^(b-1)``; for b in (1, 2, 4, 8), ``8 // b`` values share one
byte, the first in the lowest bits (2-bit: four a byte, 4-bit: two a byte).
Other widths (3, 5, 6, 7) are stored one a byte: no bit is split across bytes.
"""

from __future__ import annotations

import torch

DENSE = (1, 2, 4, 8)


def per_byte(bits: int) -> int:
    """Values stored in one byte at ``bits``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"{bits}-bit integers cannot be packed into bytes (1..8 bits)")
    return 8 // bits if bits in DENSE else 1


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` values at ``bits``."""
    return -(-numel // per_byte(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers ``q`` (any shape, values in the symmetric ``bits`` range) -> flat uint8."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    u = (flat + 2 ** (bits - 1)).to(torch.uint8)
    n = per_byte(bits)
    if n == 1:
        return u
    pad = (-u.numel()) % n
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.reshape(-1, n)
    out = torch.zeros(u.shape[0], dtype=torch.uint8, device=u.device)
    for i in range(n):
        out |= u[:, i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Flat uint8 from :func:`pack` -> the first ``numel`` signed integers (int8, flat)."""
    n = per_byte(bits)
    if n == 1:
        u = packed[:numel]
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        u = ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    return (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
