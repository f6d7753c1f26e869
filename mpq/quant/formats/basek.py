"""Base-k packing of codes in [0, k) into bytes, and back (pure functions): about log2(k) bits a code."""

from __future__ import annotations

import torch


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
