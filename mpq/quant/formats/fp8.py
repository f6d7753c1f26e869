"""``fp8``: float8 e4m3 codes with an fp32 scale per output channel (absolute maximum / 448)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpq.quant.formats.base import Format, Params, ParamShapes
from mpq.quant.quantizer import EPS

FP8_MAX = 448.0
NAMES = ("fp8", "fp8-e4m3", "e4m3")


@dataclass(frozen=True)
class FP8Format(Format):
    choices = "fp8"

    @classmethod
    def from_name(cls, name: str) -> FP8Format | None:
        return cls() if name in NAMES else None

    @property
    def name(self) -> str:
        return "fp8"

    @property
    def nominal_bits(self) -> float:
        return 8.0

    @property
    def bank(self) -> str:
        return "wf_fp8_"

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        return {"scale": ((int(shape[0]),), torch.float32)}

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        amax = w.detach().float().reshape(w.shape[0], -1).abs().amax(dim=1)
        return {"scale": (amax / FP8_MAX).clamp(min=EPS)}

    @staticmethod
    def _scale(p: Params, shape: Sequence[int]) -> torch.Tensor:
        return p["scale"].float().reshape((-1,) + (1,) * (len(shape) - 1))

    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        x = (w.detach().float() / self._scale(p, w.shape).to(w.device)).clamp(-FP8_MAX, FP8_MAX)
        return x.to(torch.float8_e4m3fn).view(torch.uint8)

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        x = codes.reshape(tuple(shape)).to(torch.uint8).view(torch.float8_e4m3fn).float()
        return x * self._scale(p, shape).to(x.device)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.reshape(-1).to(torch.uint8)

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        return packed[:numel]

    def packed_bytes(self, numel: int) -> int:
        return int(numel)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        return float(int(shape[0]) * scale_bytes)
