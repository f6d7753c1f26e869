"""BitPlan and the MixDQ plan formats.

A plan file maps layer name -> bits (``weight_<avg>_<K>.yaml``,
``act_<avg>_<K>.yaml``). An activation plan may omit layers: their inputs
stay floating point. An act-protect list names layers whose activations stay
FP; MixDQ stores it with ``torch.save``, mpq also reads YAML/JSON/text lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mpq.errors import MpqError
from mpq.io import read_yaml, write_yaml


@dataclass
class BitPlan:
    """Bits per layer for weights and activations; an absent layer is FP there."""

    weight: dict[str, int] = field(default_factory=dict)
    act: dict[str, int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, names: Iterable[str], w_bits: int | None, a_bits: int | None) -> BitPlan:
        names = list(names)
        return cls({n: w_bits for n in names} if w_bits else {}, {n: a_bits for n in names} if a_bits else {})

    def protect(self, names: Iterable[str], weights: bool = False) -> BitPlan:
        """A copy whose activations of ``names`` stay FP (and their weights too with ``weights``, as MixDQ's
        final inference keeps act-protected layers entirely FP)."""
        drop = set(names)
        weight = {n: b for n, b in self.weight.items() if n not in drop} if weights else dict(self.weight)
        return BitPlan(weight, {n: b for n, b in self.act.items() if n not in drop})


def read_plan(path: str | Path) -> dict[str, int]:
    """Read a MixDQ plan yaml: {layer: int bits}."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise MpqError(f"{path}: a plan is a YAML mapping 'layer name: bits'; this file is {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise MpqError(f"{path}: layer '{bad[0]}' has bits {data[bad[0]]!r}; bits must be integers")
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
            raise MpqError(f"{p}: not a torch.save'd list of layer names ({type(err).__name__})") from None
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

    from mpq.io import write_with

    names = list(names)
    write_with(path, lambda tmp: torch.save(names, tmp))


# ----------------------------------------------------------------------------- size accounting
def weight_bytes(numel: int, n_scales: int, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2) -> float:
    """Bytes of one layer's weight: packed ``bits``-bit integers plus one scale per channel
    (symmetric: no zero point); ``bits=None`` is the FP weight (``fp_bytes`` an element)."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-numel * bits // 8) + n_scales * scale_bytes)


def act_bytes(numel: int, bits: int | None, scale_bytes: int = 2, fp_bytes: int = 2, n_parts: int = 1, fp_numel: int = 0) -> float:
    """Bytes of one layer's input activation for one sample: packed integers plus a per-tensor scale
    and zero point for each of its ``n_parts`` quantizers, ``fp_numel`` elements (a BOS token) kept FP;
    ``bits=None`` keeps it all FP."""
    if bits is None:
        return float(numel * fp_bytes)
    return float(-(-(numel - fp_numel) * bits // 8) + 2 * scale_bytes * n_parts + fp_numel * fp_bytes)
