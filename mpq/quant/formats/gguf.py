"""``gguf-<type>``: a ggml tensor type as GGUF files store it (ComfyUI-GGUF, stable-diffusion.cpp, diffusers'
``GGUFQuantizationConfig``), quantized and dequantized by the ``gguf`` package itself.

mpq does not re-implement ggml: the fake-quant weight is ``gguf.quants.dequantize(gguf.quants.quantize(w, type))``
of the weight as a GGUF file holds it (rows of ``in_features`` values; blocks of 32 along a row, 256 for the
ternary types), and the price is the bytes those blocks take (``GGML_QUANT_SIZES``: Q4_0 18 bytes a block of 32, 4.5
bits a weight; Q4_1 5.0; Q5_0 5.5; Q5_1 6.0; Q8_0 8.5; MXFP4 4.25; TQ1_0 1.69; TQ2_0 2.06). The types are the ones
the ``gguf`` package can write (:data:`TYPES`); its K-quants and IQ types it can only read.

Where a runtime keeps a tensor in floating point, so does the candidate: a row that is not a whole number of blocks,
and a convolution's weight (diffusers' GGUF loader quantizes Linear layers only: its convolutions, biases and norms
are F16/F32). There the layer stays FP in that candidate (simulated, priced and exported so: F16 is the FP
candidate's storage). Like SDNQ's formats these are data-free (nothing to calibrate) and keep no FP BOS row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpq.errors import MpqError
from mpq.quant.formats.base import RuntimeFormat

INSTALL = "pip install -e .  (mpq depends on gguf)"
PREFIX = "gguf-"
# the quantized types the gguf package writes: name -> (block elements, block bytes, bytes of the block's scales);
# tests check the first two against gguf's own GGML_QUANT_SIZES
TYPES: dict[str, tuple[int, int, int]] = {
    "q4_0": (32, 18, 2),  # fp16 scale + 32 4-bit codes
    "q4_1": (32, 20, 4),  # fp16 scale and minimum
    "q5_0": (32, 22, 2),
    "q5_1": (32, 24, 4),
    "q8_0": (32, 34, 2),
    "mxfp4": (32, 17, 1),  # e8m0 shared exponent + 32 e2m1 codes
    "tq1_0": (256, 54, 2),  # ternary, base-3 packed
    "tq2_0": (256, 66, 2),
}
CHOICES = "gguf-<q4_0|q4_1|q5_0|q5_1|q8_0|mxfp4|tq1_0|tq2_0>"


def gguf_quants() -> Any:
    """The ``gguf`` package's quantization module (a one-line error naming the install when it is missing)."""
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as err:
        raise MpqError(f"GGUF weight formats need the gguf package ({err}); install it with {INSTALL}") from None
    return quants, GGMLQuantizationType


@dataclass(frozen=True)
class GgufFormat(RuntimeFormat):
    qtype: str

    choices = CHOICES
    runtime = "gguf"
    not_packed = "{name} is a GGUF type, stored by a GGUF file: mpq's packed export does not hold it"

    def __post_init__(self) -> None:
        if self.qtype in ("f16", "bf16", "f32"):
            raise MpqError(f"{self.name} is floating point: a layer left out of the plan is the FP candidate (F16)")
        if self.qtype not in TYPES:
            raise MpqError(f"the gguf package does not write ggml type {self.qtype!r}")

    @classmethod
    def from_name(cls, name: str) -> GgufFormat | None:
        return cls(name[len(PREFIX) :]) if name.startswith(PREFIX) else None

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.qtype}"

    @property
    def block(self) -> tuple[int, int]:
        """(elements, bytes) of one block."""
        return TYPES[self.qtype][:2]

    @property
    def nominal_bits(self) -> float:
        """Code bits a weight (the block's scales are parameters, as every format counts them)."""
        elements, nbytes, scales = TYPES[self.qtype]
        return 8.0 * (nbytes - scales) / elements

    @property
    def bank(self) -> str:
        return "wf_gguf_"  # no parameters: nothing is stored in a checkpoint

    def stores(self, shape: Sequence[int]) -> bool:
        """A Linear weight whose rows are whole blocks (a runtime keeps anything else in floating point)."""
        return len(shape) == 2 and int(shape[1]) % self.block[0] == 0

    def decoded(self, w: torch.Tensor) -> torch.Tensor:
        quants, types = gguf_quants()
        qtype = types[self.qtype.upper()]
        rows = w.detach().float().cpu().numpy()
        decoded = quants.dequantize(quants.quantize(rows, qtype), qtype)
        return torch.from_numpy(decoded.copy()).reshape(w.shape).to(device=w.device, dtype=w.dtype)

    def stored_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int = 2) -> float:
        if not self.stores(shape):
            raise MpqError(f"{self.name} does not store a weight of shape {tuple(shape)}; it stays FP")
        elements, nbytes = self.block
        return float(math.prod(shape) // elements * nbytes)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        """The blocks' scales (stored as ggml stores them, whatever ``scale_bytes`` the cost model uses)."""
        elements, _, scales = TYPES[self.qtype]
        return float(math.prod(shape) // elements * scales)
