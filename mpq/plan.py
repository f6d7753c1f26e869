"""BitPlan, the MixDQ plan files, and the one cost model (bits and bytes).

A :class:`BitPlan` is the one thing that flows from the search to selection,
inference, the report and export: weight bits and activation bits per layer
(an absent layer is floating point there) and the act-protected layers.

MixDQ's files: a plan maps layer name -> bits (``weight_<avg>_<K>.yaml``,
``act_<avg>_<K>.yaml``; an activation plan omits layers whose inputs stay
FP); an act-protect list names layers whose activations stay FP (MixDQ
stores it with ``torch.save``; mpq also reads YAML/JSON/text lists).

:class:`CostModel` prices a layer at a bit-width in bytes: packed integers
plus the quantizers' scales (and zero points), FP layers at the model
dtype's element size. Average bits are size-weighted over all layers, FP
layers counting ``8 * fp_bytes`` bits: the one convention everywhere a
number is reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mpq.errors import MpqError
from mpq.files import read_yaml, write_yaml

if TYPE_CHECKING:
    from mpq.quant.model import LayerInfo


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BitPlan:
    """Bits per layer for weights and activations (absent: FP) and the act-protected layers."""

    weight: Mapping[str, int] = field(default_factory=dict)
    act: Mapping[str, int] = field(default_factory=dict)
    protected: frozenset[str] = frozenset()  # activations FP whatever ``act`` says (MixDQ's act_protect)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", {str(k): int(v) for k, v in self.weight.items()})
        object.__setattr__(self, "act", {str(k): int(v) for k, v in self.act.items() if k not in self.protected})
        object.__setattr__(self, "protected", frozenset(self.protected))

    @classmethod
    def uniform(cls, names: Iterable[str], w_bits: int | None, a_bits: int | None) -> BitPlan:
        names = list(names)
        return cls({n: w_bits for n in names} if w_bits else {}, {n: a_bits for n in names} if a_bits else {})

    def protect(self, names: Iterable[str], weights: bool = False) -> BitPlan:
        """A copy whose activations of ``names`` stay FP (and their weights too with ``weights``, as MixDQ's
        final inference keeps act-protected layers entirely FP)."""
        drop = set(names)
        weight = {n: b for n, b in self.weight.items() if n not in drop} if weights else dict(self.weight)
        return BitPlan(weight, self.act, self.protected | drop)

    def with_act(self, act: Mapping[str, int]) -> BitPlan:
        """This plan's weights and protected layers with another activation plan."""
        return BitPlan(self.weight, act, self.protected)

    # ------------------------------------------------------------------ MixDQ files
    @classmethod
    def load(cls, weight: str | Path | None = None, act: str | Path | None = None, protect: str | Path | None = None,
             protect_weights: bool = False) -> BitPlan:
        """A plan from MixDQ files (any may be omitted: that side stays FP)."""
        plan = cls(read_plan(weight) if weight else {}, read_plan(act) if act else {})
        return plan.protect(read_layer_list(protect), protect_weights) if protect else plan

    def save(self, folder: str | Path, weight: str = "weight.yaml", act: str = "act.yaml", protect: str = "act_protect.pt") -> None:
        """MixDQ's files: the weight plan, the activation plan (protected layers omitted), the act-protect list."""
        folder = Path(folder)
        write_plan(folder / weight, self.weight)
        write_plan(folder / act, self.act)
        write_layer_list(folder / protect, sorted(self.protected))

    def validate(self, layer_names: Iterable[str], bits: Iterable[int], source: str = "plan") -> BitPlan:
        """One-line errors for a layer the model lacks or a bit-width not calibrated; returns the plan."""
        names = list(layer_names)
        validate_plan(self.weight, names, bits, f"{source} (weights)")
        validate_plan(self.act, names, bits, f"{source} (activations)")
        unknown = sorted(self.protected - set(names))
        if unknown:
            raise MpqError(f"{source}: act-protected layer '{unknown[0]}' is not a quantizable layer of this model; "
                           "see `mpq layers --config ...` for the names")
        return self

    def cost(self, infos: Sequence[LayerInfo], model: CostModel) -> PlanCost:
        return model.plan_cost(self, infos)


# ----------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class PlanCost:
    weight_bytes: float
    act_bytes: float  # one sample's summed input activations
    fp_weight_bytes: float  # every weight FP (model dtype)
    weight_avg_bits: float
    act_avg_bits: float
    group_weight_avg_bits: dict[str, float]
    group_act_avg_bits: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("weight_bytes", "act_bytes", "fp_weight_bytes", "weight_avg_bits", "act_avg_bits")}
        for g, v in self.group_weight_avg_bits.items():
            out[f"{g}_weight_avg_bits"] = v
        for g, v in self.group_act_avg_bits.items():
            out[f"{g}_act_avg_bits"] = v
        return out


@dataclass(frozen=True)
class CostModel:
    scale_bytes: int = 2  # bytes per stored scale / zero point (fp16)
    fp_bytes: int = 2  # bytes per element of a tensor kept in floating point (the model dtype)
    per_channel: bool = True  # weight scales per output channel (else one per input part)

    @classmethod
    def from_config(cls, cfg: Any) -> CostModel:
        fp = cfg.search.fp_bytes or {"fp32": 4, "fp16": 2, "bf16": 2}[cfg.model.dtype]
        return cls(int(cfg.search.scale_bytes), int(fp), cfg.quant.weight.granularity == "channel")

    @property
    def fp_bits(self) -> int:
        return 8 * self.fp_bytes

    def weight_bytes(self, info: LayerInfo, bits: int | None) -> float:
        scales = (info.out_channels if self.per_channel else 1) * info.n_parts
        return weight_bytes(info.weight_numel, scales, bits, self.scale_bytes, self.fp_bytes)

    def act_bytes(self, info: LayerInfo, bits: int | None) -> float:
        return act_bytes(info.act_numel, bits, self.scale_bytes, self.fp_bytes, info.n_parts, info.bos_numel)

    def plan_cost(self, plan: BitPlan, infos: Sequence[LayerInfo]) -> PlanCost:
        def avg(bits: Mapping[str, int], attr: str, group: str | None = None) -> float:
            chosen = [i for i in infos if group is None or i.group == group]
            total = sum(getattr(i, attr) for i in chosen)
            return sum(float(bits.get(i.name, self.fp_bits)) * getattr(i, attr) for i in chosen) / total if total else float("nan")

        groups = sorted({i.group for i in infos})
        return PlanCost(
            weight_bytes=sum(self.weight_bytes(i, plan.weight.get(i.name)) for i in infos),
            act_bytes=sum(self.act_bytes(i, plan.act.get(i.name)) for i in infos),
            fp_weight_bytes=sum(self.weight_bytes(i, None) for i in infos),
            weight_avg_bits=avg(plan.weight, "weight_numel"),
            act_avg_bits=avg(plan.act, "act_numel"),
            group_weight_avg_bits={g: avg(plan.weight, "weight_numel", g) for g in groups},
            group_act_avg_bits={g: avg(plan.act, "act_numel", g) for g in groups},
        )


def weight_bytes(numel: float, n_scales: int, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2) -> float:
    """Bytes of one layer's weight: packed ``bits``-bit integers plus ``n_scales`` scales (symmetric: no
    zero point); ``bits=None`` is the FP weight (``fp_bytes`` an element)."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-numel * bits // 8) + n_scales * scale_bytes)


def act_bytes(numel: float, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2, n_parts: int = 1, fp_numel: int = 0) -> float:
    """Bytes of one layer's input activation for one sample: packed integers plus a per-tensor scale
    and zero point for each of its ``n_parts`` quantizers, ``fp_numel`` elements (a BOS token) kept FP;
    ``bits=None`` keeps it all FP."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-(numel - fp_numel) * bits // 8) + 2 * scale_bytes * n_parts + fp_numel * fp_bytes)


# ----------------------------------------------------------------------------- MixDQ plan files
def read_plan(path: str | Path) -> dict[str, int]:
    """Read a MixDQ plan yaml: {layer: int bits}."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise MpqError(f"{path}: a plan is a YAML mapping 'layer name: bits'; this file is {type(data).__name__}: fix or delete it")
    bad = [k for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise MpqError(f"{path}: layer '{bad[0]}' has bits {data[bad[0]]!r}; bits must be integers: fix the file, or delete it and re-run the stage that wrote it")
    return {str(k): int(v) for k, v in data.items()}


def write_plan(path: str | Path, plan: Mapping[str, int]) -> None:
    write_yaml(path, {k: int(v) for k, v in plan.items()})


def validate_plan(plan: Mapping[str, int], layer_names: Iterable[str], bits: Iterable[int], source: str) -> None:
    """One-line errors for a layer the model lacks or a bit-width not calibrated."""
    known = set(layer_names)
    allowed = sorted(set(bits))
    for name, b in plan.items():
        if name not in known:
            raise MpqError(f"{source}: layer '{name}' is not a quantizable layer of this model; see `mpq layers --config ...` for the names")
        if b not in allowed:
            raise MpqError(f"{source}: layer '{name}' asks for {b} bits, but the checkpoint calibrated only {allowed}; re-run ptq with quant.bits including {b}")


def read_layer_list(path: str | Path) -> list[str]:
    """Act-protect list: torch.save'd list (MixDQ), YAML/JSON list, or one name a line."""
    p = Path(path)
    if not p.is_file():
        raise MpqError(f"{p}: act-protect file not found")
    raw = p.read_bytes()
    items: object
    if p.suffix in (".pt", ".pth") or raw[:2] == b"PK" or raw[:1] == b"\x80":
        import torch

        try:
            items = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise MpqError(f"{p}: not a torch.save'd list of layer names ({type(err).__name__}); delete it and re-run the stage that wrote it") from None
    else:
        text = raw.decode(errors="replace")
        try:
            items = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError):
            items = None
        if not isinstance(items, list):
            items = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise MpqError(f"{p}: an act-protect file is a list of layer names")
    return list(items)


def write_layer_list(path: str | Path, names: Iterable[str]) -> None:
    """Write an act-protect list as MixDQ does (torch.save of a list of str)."""
    import torch

    from mpq.files import write_with

    names = list(names)
    write_with(path, lambda tmp: torch.save(names, tmp))
