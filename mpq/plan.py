"""BitPlan and MixDQ's plan files.

A :class:`BitPlan` is the one plan type: it flows from the search to
selection, inference, the report and export: weight bits and activation bits
per layer (an absent layer is floating point there) and the act-protected
layers. What a plan costs is :mod:`mpq.cost`'s.

MixDQ's files: a plan maps layer name -> bits (``weight_<avg>_<K>.yaml``,
``act_<avg>_<K>.yaml``; an activation plan omits layers whose inputs stay
FP); an act-protect list names layers whose activations stay FP (MixDQ
stores it with ``torch.save``; mpq also reads YAML/JSON/text lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mpq.errors import MpqError
from mpq.runner.files import read_yaml, write_layer_list, write_yaml

if TYPE_CHECKING:
    from mpq.runner.rundir import RunDir


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
    def load(
        cls,
        weight: str | Path | None = None,
        act: str | Path | None = None,
        protect: str | Path | None = None,
        protect_weights: bool = False,
    ) -> BitPlan:
        """A plan from MixDQ files (any may be omitted: that side stays FP)."""
        plan = cls(read_plan(weight) if weight else {}, read_plan(act) if act else {})
        return plan.protect(read_layer_list(protect), protect_weights) if protect else plan

    def save(
        self, folder: str | Path, weight: str = "weight.yaml", act: str = "act.yaml", protect: str = "act_protect.pt"
    ) -> None:
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
            raise MpqError(
                f"{source}: act-protected layer '{unknown[0]}' is not a quantizable layer of this model; "
                "see `mpq layers --config ...` for the names"
            )
        return self


def final_plan(run: RunDir) -> BitPlan:
    """The selected plan of a run (MixDQ's files ``selection/final_{weight,act}.yaml``, ``final_act_protect.pt``),
    exactly as selection ran it."""
    hint = f"run `mpq select --base_path {run.root}` first"
    plan = BitPlan(read_plan(run.require(run.final_weight, hint)), read_plan(run.require(run.final_act, hint)))
    return plan.protect(read_layer_list(run.final_protect)) if run.final_protect.is_file() else plan


def plan_from_args(
    names: Sequence[str],
    bits: Sequence[int],
    weight_bits: int | None = None,
    act_bits: int | None = None,
    weight_plan: str | Path | None = None,
    act_plan: str | Path | None = None,
    act_protect: str | Path | None = None,
    protect_weights: bool = False,
) -> BitPlan:
    """A plan from command-line options: plan files win over uniform bits; ``protect_weights`` keeps the act-protected
    layers' weights FP too. Validated against the layer ``names`` and calibrated ``bits``."""
    for kind, b in (("weight", weight_bits), ("activation", act_bits)):
        if b is not None and b not in bits:
            raise MpqError(f"uniform {kind} bits {b} were not calibrated (checkpoint has {list(bits)})")
    uniform = BitPlan.uniform(names, weight_bits, act_bits)
    files = BitPlan.load(weight_plan, act_plan)
    plan = BitPlan(files.weight if weight_plan else uniform.weight, files.act if act_plan else uniform.act)
    if act_protect:
        plan = plan.protect(read_layer_list(act_protect), protect_weights)
    return plan.validate(names, bits, str(weight_plan or act_plan or act_protect or "plan"))


# ----------------------------------------------------------------------------- MixDQ plan files
def read_plan(path: str | Path) -> dict[str, int]:
    """Read a MixDQ plan yaml: {layer: int bits}."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise MpqError(
            f"{path}: a plan is a YAML mapping 'layer name: bits'; this file is {type(data).__name__}: fix or delete it"
        )
    bad = [k for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise MpqError(
            f"{path}: layer '{bad[0]}' has bits {data[bad[0]]!r}; bits must be integers: fix the file, or delete it "
            "and re-run the stage that wrote it"
        )
    return {str(k): int(v) for k, v in data.items()}


def write_plan(path: str | Path, plan: Mapping[str, int]) -> None:
    write_yaml(path, {k: int(v) for k, v in plan.items()})


def validate_plan(plan: Mapping[str, int], layer_names: Iterable[str], bits: Iterable[int], source: str) -> None:
    """One-line errors for a layer the model lacks or a bit-width not calibrated."""
    known = set(layer_names)
    allowed = sorted(set(bits))
    for name, b in plan.items():
        if name not in known:
            raise MpqError(
                f"{source}: layer '{name}' is not a quantizable layer of this model; see `mpq layers --config ...` for "
                "the names"
            )
        if b not in allowed:
            raise MpqError(
                f"{source}: layer '{name}' asks for {b} bits, but the checkpoint calibrated only {allowed}; re-run ptq "
                f"with quant.bits including {b}"
            )


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
            raise MpqError(
                f"{p}: not a torch.save'd list of layer names ({type(err).__name__}); delete it and re-run the stage "
                "that wrote it"
            ) from None
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
