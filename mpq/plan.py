"""BitPlan and MixDQ's plan files.

A :class:`BitPlan` is the one plan type: it flows from the search to
selection, inference, the report and export: weight bits and activation bits
per layer (an absent layer is floating point there) and the act-protected
layers. What a plan costs is :mod:`mpq.cost`'s.

MixDQ's files: a plan maps layer name -> bits (``weight_<avg>_<K>.yaml``,
``act_<avg>_<K>.yaml``; an activation plan omits layers whose inputs stay
FP); an act-protect list names layers whose activations stay FP (MixDQ
stores it with ``torch.save``; mpq also reads YAML/JSON/text lists).

A weight plan may also name formats (``nf12``, ``fp8``, ``int4-asym-g64``:
:mod:`mpq.quant.formats`). Such a plan is written as ``<name>.formats.yaml``
(layer -> bits or format name), never under the ``.yaml`` name MixDQ's
scripts build (``weight_<avg>_<K>.yaml``, ``final_weight.yaml``): MixDQ's
reader, which takes every value as a bit-width, never opens it. Integer-only
plans are written exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mpq.errors import MpqError
from mpq.quant.formats import FORMATS_KEY, Key, known_formats, resolve, weight_key
from mpq.runner.choices import MAX_BITS, MIN_BITS
from mpq.runner.files import FORMATS_SUFFIX, formats_twin, read_yaml, write_layer_list, write_yaml

if TYPE_CHECKING:
    from mpq.runner.rundir import RunDir


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BitPlan:
    """Bits (or a weight format) per layer for weights, bits for activations (absent: FP), and the act-protected
    layers."""

    weight: Mapping[str, Key] = field(default_factory=dict)
    act: Mapping[str, int] = field(default_factory=dict)
    protected: frozenset[str] = frozenset()  # activations FP whatever ``act`` says (MixDQ's act_protect)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", {str(k): weight_key(v) for k, v in self.weight.items()})
        object.__setattr__(self, "act", {str(k): int(v) for k, v in self.act.items() if k not in self.protected})
        object.__setattr__(self, "protected", frozenset(self.protected))

    @classmethod
    def uniform(cls, names: Iterable[str], w_bits: Key | None, a_bits: int | None) -> BitPlan:
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

    @property
    def formats(self) -> list[str]:
        """The weight formats the plan uses besides the checkpoint's integer bits (``quant.weight_formats``; sorted)."""
        return sorted({str(v) for v in self.weight.values() if resolve(v).config_key == FORMATS_KEY})

    def validate(
        self, layer_names: Iterable[str], bits: Iterable[int], source: str = "plan", formats: Iterable[str] = ()
    ) -> BitPlan:
        """One-line errors for a layer the model lacks, or a bit-width or format not calibrated; returns the plan."""
        names = list(layer_names)
        validate_plan(self.weight, names, [*bits, *formats], f"{source} (weights)", data_free=True)
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
    weight, act = (run.require(plan_file(p), hint) for p in (run.final_weight, run.final_act))
    plan = BitPlan(read_plan(weight), read_plan(act))
    return plan.protect(read_layer_list(run.final_protect)) if run.final_protect.is_file() else plan


def plan_from_args(
    names: Sequence[str],
    bits: Sequence[int],
    weight_bits: Key | None = None,
    act_bits: int | None = None,
    weight_plan: str | Path | None = None,
    act_plan: str | Path | None = None,
    act_protect: str | Path | None = None,
    protect_weights: bool = False,
    formats: Sequence[str] = (),
) -> BitPlan:
    """A plan from command-line options: plan files win over uniform bits (or a uniform weight format);
    ``protect_weights`` keeps the act-protected layers' weights FP too. Validated against the layer ``names``,
    calibrated ``bits`` and ``formats``."""
    weight_bits = None if weight_bits is None else weight_key(weight_bits)
    for kind, b, known in (("weight", weight_bits, [*bits, *formats]), ("activation", act_bits, list(bits))):
        if b is not None and b not in known:
            raise MpqError(
                f"uniform {kind} bits {b} were not calibrated (checkpoint has {known}); "
                + _calibrate_hint(b, f"--{kind.removesuffix('ivation')}-bits fp")
            )
    uniform = BitPlan.uniform(names, weight_bits, act_bits)
    files = BitPlan.load(weight_plan, act_plan)
    plan = BitPlan(files.weight if weight_plan else uniform.weight, files.act if act_plan else uniform.act)
    if act_protect:
        plan = plan.protect(read_layer_list(act_protect), protect_weights)
    return plan.validate(names, bits, str(weight_plan or act_plan or act_protect or "plan"), formats)


# ----------------------------------------------------------------------------- MixDQ plan files
def _has_formats(plan: Mapping[str, Key]) -> bool:
    return any(isinstance(v, str) for v in plan.values())


def plan_file_name(stem: str, plan: Mapping[str, Key]) -> str:
    """A plan's file name: ``<stem>.yaml`` (MixDQ's) for integer bits only, ``<stem>.formats.yaml`` with formats."""
    return stem + (FORMATS_SUFFIX if _has_formats(plan) else ".yaml")


def read_plan(path: str | Path) -> dict[str, Key]:
    """Read a plan yaml: {layer: bits} (MixDQ's), or with format names (``.formats.yaml``; read in its place when
    ``path`` is missing)."""
    p = plan_file(path)
    data = read_yaml(p)
    if not isinstance(data, dict) or not data:
        raise MpqError(
            f"{p}: a plan is a YAML mapping 'layer name: bits'; this file is {type(data).__name__}: fix or delete it"
        )
    out: dict[str, Key] = {}
    for k, v in data.items():
        ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok and isinstance(v, str) and p.name.endswith(FORMATS_SUFFIX):
            try:
                v, ok = weight_key(v), True
            except MpqError:
                ok = False
        if not ok:
            what = f"integers or weight formats ({known_formats()})" if p.name.endswith(FORMATS_SUFFIX) else "integers"
            raise MpqError(
                f"{p}: layer '{k}' has bits {v!r}; bits must be {what}: fix the file, or delete it and re-run the "
                "stage that wrote it"
            )
        out[str(k)] = v
    return out


def plan_file(path: str | Path) -> Path:
    """The file a plan written at ``path`` (by :func:`write_plan`) is in: MixDQ's name, or its ``.formats.yaml``
    twin when only that exists (a missing plan keeps MixDQ's name, for the message)."""
    p = Path(path)
    return formats_twin(p) if not p.is_file() and formats_twin(p).is_file() else p


def write_plan(path: str | Path, plan: Mapping[str, Key]) -> Path:
    """Write a plan: at ``path`` with integer bits only (MixDQ's file), else at its ``.formats.yaml`` twin; the other
    variant of the name is removed (no stale twin). Returns the path written."""
    p = Path(path)
    mixdq = p.with_name(p.name[: -len(FORMATS_SUFFIX)] + ".yaml") if p.name.endswith(FORMATS_SUFFIX) else p
    target, other = (formats_twin(p), mixdq) if _has_formats(plan) else (mixdq, formats_twin(p))
    write_yaml(target, {k: v if isinstance(v, str) else int(v) for k, v in plan.items()})
    if other != target and other.is_file():
        other.unlink()
    return target


def validate_plan(
    plan: Mapping[str, Key], layer_names: Iterable[str], bits: Iterable[Key], source: str, data_free: bool = False
) -> None:
    """One-line errors for a layer the model lacks or a bit-width (format) not calibrated; with ``data_free`` (weight
    plans) a format with nothing to calibrate (SDNQ's) needs no checkpoint entry."""
    known = set(layer_names)
    allowed = list(dict.fromkeys(bits))
    for name, b in plan.items():
        if name not in known:
            raise MpqError(
                f"{source}: layer '{name}' is not a quantizable layer of this model; see `mpq layers --config ...` for "
                "the names"
            )
        if b not in allowed and not (data_free and resolve(b).data_free):
            raise MpqError(
                f"{source}: layer '{name}' asks for {b} bits, but the checkpoint calibrated only {allowed}; "
                + _calibrate_hint(b, "leave the layer out of the plan file")
            )


def _calibrate_hint(b: Key, keep_fp: str) -> str:
    """How to get ``b``: a width outside what the quantizer stores cannot be calibrated, floating point is asked
    for otherwise; anything else is calibrated by PTQ with its config key."""
    if isinstance(b, int) and not MIN_BITS <= b <= MAX_BITS:
        return f"integer widths are {MIN_BITS}..{MAX_BITS}; to keep layers floating point, {keep_fp}"
    return f"re-run ptq with {resolve(b).config_key} including {b}"


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
