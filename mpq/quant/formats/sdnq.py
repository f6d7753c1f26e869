"""``sdnq-<dtype>[-g<N>|-row]``: a weight dtype of SDNQ (SD.Next's quantization engine, pip ``sdnq``), quantized
and dequantized by SDNQ itself.

mpq does not re-implement SDNQ: the fake-quant weight is what ``sdnq.quantizer.sdnq_quantize_layer_weight`` stores,
decoded by the dequantizer it returns (the weight SDNQ's own ``SDNQLinear`` / ``SDNQConv2d`` compute with), and a
layer's price is the bytes of the tensors it stores (packed codes, scales, zero points, as SDNQ saves them). SDNQ's
quantization is data-free: there is nothing to calibrate, so a checkpoint holds no parameters for these formats.

Names: ``<dtype>`` is SDNQ's own name (:data:`DTYPES`: its integer and unsigned integer types from 1 to 8 bits, its
float8 types and its low-bit float aliases ``fp2``..``fp7``, ``ufp2``..``ufp8``); the group is SDNQ's default rule
when not given (``group_size=0``: 2^(bits+2) input channels for a Linear, 2^(bits+1) for a Conv2d, row-wise for
8-bit), ``-row`` one scale per output row (``group_size=-1``), ``-g<N>`` groups of N input channels (SDNQ turns an N
that does not divide the row into the nearest divisor, as it would in SD.Next). ``-had`` adds SDNQ's Hadamard
rotation of the input channels before quantizing (in blocks of up to 256; SDNQ skips it where the row has no block
of 4 or more), undone when it dequantizes: no bytes added. SDNQ's SVD option is not offered: its low-rank factors
come from a randomized SVD, so the weight SDNQ would store is not reproducible layer by layer.

SDNQ's own size limits (it leaves a layer below 16,384 weights or 32 input channels unconverted by default) do not
apply: mpq's program decides which layers pay for their scales, and ``mpq export --format sdnq`` lowers the limits
so SDNQ converts exactly the planned layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from mpq.errors import MpqError
from mpq.quant.formats.base import RuntimeFormat

INSTALL = 'pip install -e ".[sdnq]"'
PREFIX = "sdnq-"
# SDNQ's weight dtypes offered as candidates (its names) and their code bits; tests check them against sdnq's own table
DTYPES: dict[str, int] = {
    **{f"int{b}": b for b in range(2, 9)},
    **{f"uint{b}": b for b in range(1, 9)},
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    **{f"fp{b}": b for b in range(2, 8)},
    **{f"ufp{b}": b for b in range(2, 9)},
}
_NAME = re.compile(r"sdnq-([a-z0-9_]+?)(?:-(row|g(\d+)))?(-had)?")
CHOICES = "sdnq-<int2..8|uint1..8|float8_e4m3fn|float8_e5m2|fp2..7|ufp2..8>[-row|-g<N>][-had]"


def sdnq_module() -> Any:
    """The ``sdnq`` package's quantizer module (imported on first use: it is optional and slow to import); a
    one-line error naming the install command when it is missing."""
    try:
        import logging

        logging.getLogger("sdnq").setLevel(logging.ERROR)  # its note that OpenVINO kernels are absent, on every import
        from sdnq import quantizer
    except ImportError as err:
        raise MpqError(f"SDNQ weight formats need the sdnq package ({err}); install it with {INSTALL}") from None
    return quantizer


def layer_class(shape: Sequence[int]) -> str:
    """The torch class SDNQ sees for a weight of ``shape`` (its rules differ for convolutions)."""
    if len(shape) == 4:
        return "Conv2d"
    if len(shape) == 2:
        return "Linear"
    raise MpqError(f"SDNQ formats quantize Linear and Conv2d weights, not a weight of shape {tuple(shape)}")


@dataclass(frozen=True)
class SdnqFormat(RuntimeFormat):
    dtype: str
    group_size: int = 0  # SDNQ's: 0 its default rule, -1 row-wise, N groups of N input channels
    hadamard: bool = False  # SDNQ's Hadamard rotation of the input channels before quantizing (undone on decode)

    choices = CHOICES
    runtime = "sdnq"
    not_packed = "{name} is SDNQ's format: export a plan using it with `mpq export --format sdnq`"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MpqError(f"SDNQ has no weight dtype {self.dtype!r} here")
        if self.group_size < -1:
            raise MpqError(f"SDNQ group size {self.group_size}: use -row, -g<N> (N >= 1), or nothing for its default")

    @classmethod
    def from_name(cls, name: str) -> SdnqFormat | None:
        m = _NAME.fullmatch(name)
        if not m:
            return None
        if m.group(3) is not None and int(m.group(3)) < 1:
            raise MpqError(f"{name}: a group holds at least 1 input channel")
        return cls(m.group(1), -1 if m.group(2) == "row" else int(m.group(3) or 0), m.group(4) is not None)

    @property
    def name(self) -> str:
        group = {0: "", -1: "-row"}.get(self.group_size, f"-g{self.group_size}")
        return f"{PREFIX}{self.dtype}{group}{'-had' if self.hadamard else ''}"

    @property
    def nominal_bits(self) -> float:
        return float(DTYPES[self.dtype])

    @property
    def bank(self) -> str:
        return "wf_sdnq_"  # no parameters: nothing is stored in a checkpoint

    def sdnq_config(self) -> dict[str, Any]:
        """The layer's entry in SDNQ's ``modules_quant_config`` (what its quantizer reads for this layer)."""
        config: dict[str, Any] = {"weights_dtype": self.dtype, "group_size": self.group_size}
        return {**config, "use_hadamard": True} if self.hadamard else config

    def quantize(self, w: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        """SDNQ's (dequantizer, stored tensors) of weight ``w`` (computing in ``w``'s dtype)."""
        q = sdnq_module()
        deq, tensors = q.sdnq_quantize_layer_weight(
            w.detach(), layer_class(w.shape), torch_dtype=w.dtype, **self.sdnq_config()
        )
        return deq, {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def stores(self, shape: Sequence[int]) -> bool:
        """SDNQ packs sub-byte codes in whole words (e.g. eight 3-bit codes in three bytes): a weight whose size does
        not fill them cannot be stored in this dtype (tried on SDNQ itself, once a shape)."""
        return _sdnq_bytes(self, tuple(int(s) for s in shape)) is not None

    def decoded(self, w: torch.Tensor) -> torch.Tensor:
        deq, tensors = self.quantize(w)
        return deq(**tensors, skip_compile=True).to(w.dtype).reshape(w.shape).clone()  # clone: a normal tensor

    def stored_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int = 2) -> float:
        """The bytes SDNQ stores for a weight of ``shape`` (measured on SDNQ's own output; they depend on the shape
        only). Scales are priced as SDNQ stores them (float32), whatever ``scale_bytes`` the cost model uses."""
        nbytes = _sdnq_bytes(self, tuple(int(s) for s in shape))
        if nbytes is None:
            raise MpqError(f"SDNQ cannot store {self.dtype} for a weight of shape {tuple(shape)}; it stays FP")
        return float(nbytes)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        """What SDNQ stores besides the codes (scales, zero points): its bytes less the codes' packed bits."""
        return self.stored_bytes(shape, in_split) - math.ceil(math.prod(shape) * self.nominal_bits / 8)


@cache
def _sdnq_bytes(fmt: SdnqFormat, shape: tuple[int, ...]) -> int | None:
    """Bytes SDNQ stores for a weight of ``shape`` in ``fmt``, None where it cannot (its packer refuses the size)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        _, tensors = fmt.quantize(w)
    except RuntimeError:  # SDNQ's packer: the codes do not fill its words
        return None
    return sum(t.numel() * t.element_size() for t in tensors.values())
