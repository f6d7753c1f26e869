"""The one cost model: what a plan costs in bytes, and its average bits.

:class:`CostModel` prices a layer at a bit-width in bytes: packed integers
plus the quantizers' scales (and zero points), a layer kept FP at the model
dtype's element size. Average bits (:func:`average_bits`) are size-weighted
over the layers a plan quantizes; the layers it keeps FP are counted apart
(and priced in bytes). The integer program's K constraint, the candidate
table, selection's scores and the report all use this one definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpq.layers import GROUPS, LayerInfo
from mpq.plan import BitPlan
from mpq.quant.formats import Format, Key, nominal_bits, resolve
from mpq.quant.quantizer import WeightQuant


def average_bits(items: Iterable[tuple[float, Key | None]]) -> float:
    """Size-weighted average bits over the ``(size, bits)`` items that are quantized (``bits`` not None; a
    format counts its code bits, :func:`~mpq.quant.formats.nominal_bits`: ``nf12`` 3.585); NaN when none is."""
    total = weighted = 0.0
    for size, bits in items:
        if bits is not None:
            total += size
            weighted += size * nominal_bits(bits)
    return weighted / total if total else math.nan


def weight_bytes(numel: float, n_scales: int, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2) -> float:
    """Bytes of one layer's weight: packed ``bits``-bit integers plus ``n_scales`` stored quantizer parameters
    (scales, and offsets for asymmetric levels); ``bits=None`` is the FP weight (``fp_bytes`` an element)."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-numel * bits // 8) + n_scales * scale_bytes)


def act_bytes(
    numel: float, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2, n_parts: int = 1, fp_numel: int = 0
) -> float:
    """Bytes of one layer's input activation for one sample: packed integers plus a per-tensor scale
    and zero point for each of its ``n_parts`` quantizers, ``fp_numel`` elements (a BOS token) kept FP;
    ``bits=None`` keeps it all FP."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-(numel - fp_numel) * bits // 8) + 2 * scale_bytes * n_parts + fp_numel * fp_bytes)


@dataclass(frozen=True)
class PlanCost:
    weight_bytes: float
    act_bytes: float  # one sample's summed input activations
    fp_weight_bytes: float  # every weight FP (model dtype)
    weight_avg_bits: float  # over the layers whose weights are quantized (NaN: none)
    act_avg_bits: float  # over the layers whose activations are quantized (NaN: none)
    weight_fp_layers: int  # layers whose weights stay FP
    act_fp_layers: int  # layers whose activations stay FP (act-protected ones included)
    group_weight_avg_bits: dict[str, float]
    group_act_avg_bits: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "weight_bytes",
                "act_bytes",
                "fp_weight_bytes",
                "weight_avg_bits",
                "act_avg_bits",
                "weight_fp_layers",
                "act_fp_layers",
            )
        }
        for g, v in self.group_weight_avg_bits.items():
            out[f"{g}_weight_avg_bits"] = v
        for g, v in self.group_act_avg_bits.items():
            out[f"{g}_act_avg_bits"] = v
        return out


@dataclass(frozen=True)
class CostModel:
    scale_bytes: int = 2  # bytes per stored scale / zero point (fp16)
    fp_bytes: int = 2  # bytes per element of a tensor kept in floating point (the model dtype)
    wq: WeightQuant = WeightQuant()  # the weight quantizer: how many scales (and offsets) a weight stores

    @classmethod
    def from_config(cls, cfg: Any) -> CostModel:
        from mpq.models import torch_dtype

        fp = cfg.search.fp_bytes or torch_dtype(cfg.model.dtype).itemsize
        return cls(int(cfg.search.scale_bytes), int(fp), WeightQuant.from_config(cfg.quant.weight))

    def format(self, key: Key) -> Format:
        """The format a weight key stands for here (a width: this cost model's weight quantizer ``wq``)."""
        return resolve(key, self.wq)

    def weight_bytes(self, info: LayerInfo, bits: Key | None) -> float:
        """Bytes of the layer's weight at ``bits`` (a width or a format: codes and parameters, exactly as export
        stores them; scales at ``scale_bytes``), or FP (``bits`` None, ``fp_bytes`` an element)."""
        fmt = None if bits is None else self.format(bits)
        if fmt is None or not fmt.stores(info.shape):  # FP, or a format its runtime cannot store at this shape
            return weight_bytes(info.weight_numel, 0, None, self.scale_bytes, self.fp_bytes)
        return fmt.stored_bytes(info.shape, info.in_split, self.scale_bytes)

    def act_bytes(self, info: LayerInfo, bits: int | None) -> float:
        return act_bytes(info.act_numel, bits, self.scale_bytes, self.fp_bytes, info.n_parts, info.bos_numel)

    def plan_cost(self, plan: BitPlan, infos: Sequence[LayerInfo]) -> PlanCost:
        def avg(bits: Mapping[str, Key], kind: str, group: str | None = None) -> float:
            return average_bits(
                (i.act_numel if kind == "act" else i.weight_numel, bits.get(i.name))
                for i in infos
                if group is None or i.group == group
            )

        groups = [g for g in GROUPS if any(i.group == g for i in infos)]
        return PlanCost(
            weight_bytes=sum(self.weight_bytes(i, plan.weight.get(i.name)) for i in infos),
            act_bytes=sum(self.act_bytes(i, plan.act.get(i.name)) for i in infos),
            fp_weight_bytes=sum(self.weight_bytes(i, None) for i in infos),
            weight_avg_bits=avg(plan.weight, "weight"),
            act_avg_bits=avg(plan.act, "act"),
            weight_fp_layers=sum(i.name not in plan.weight for i in infos),
            act_fp_layers=sum(i.name not in plan.act for i in infos),
            group_weight_avg_bits={g: avg(plan.weight, "weight", g) for g in groups},
            group_act_avg_bits={g: avg(plan.act, "act", g) for g in groups},
        )
