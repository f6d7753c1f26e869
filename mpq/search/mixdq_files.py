"""MixDQ's search inputs: sensitivity files and tensor-size ("ratio") files.

A sensitivity file maps layer -> [metric at each candidate bit]; the scores of
weight formats (``nf12`` ...) are kept beside it in ``<file>.formats.yaml``
(layer -> {format: metric}), so MixDQ's reader only ever sees its integer
bits' lists. A ratio file
maps layer -> its tensor size relative to ``conv_in``. In MixDQ-file mode the
layers come from these files alone: content = the layers of the SSIM file,
sizes = the ratios (so "bytes" are in ratio units).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.runner.files import formats_twin, read_yaml, write_yaml

MAX_SQNR_DB = 150.0  # +inf SQNR (a bit-exact layer) is clipped here: fp32 carries ~150 dB


def read_sensitivity(path: str | Path, cands: int | Sequence[Any]) -> dict[str, list[float]]:
    """A sensitivity file: {layer: [metric at each candidate]}. ``cands``: the candidates (integer bits first, then
    format names, read from its ``.formats.yaml`` twin), or just how many integer bits (MixDQ's file alone)."""
    if isinstance(cands, int):
        return _read_mixdq(path, cands)
    ints = [c for c in cands if isinstance(c, int)]
    names = [c for c in cands if not isinstance(c, int)]
    out = _read_mixdq(path, len(ints))
    if not names or not out:
        return out
    side = formats_twin(path)
    fix = f"delete {path} and re-run `mpq sensitivity`"
    data = read_yaml(side) if side.is_file() else None
    if not isinstance(data, dict):
        raise MpqError(f"{side} is missing or not a mapping (the scores of formats {names}); {fix}")
    for name in out:
        row = data.get(name)
        if not isinstance(row, dict) or any(f not in row for f in names):
            missing = next((f for f in names if not isinstance(row, dict) or f not in row), names[0])
            raise MpqError(f"{side}: layer '{name}' has no score for format {missing}; {fix}")
        out[name] = out[name] + _scores([row[f] for f in names], f"{side}: layer '{name}'", row, fix, fix)
    return out


def write_sensitivity(path: str | Path, values: Mapping[str, list[float]], cands: Sequence[Any]) -> None:
    """Write scores of ``cands`` (integer bits first, then formats): MixDQ's file for the bits, the formats' scores in
    its ``.formats.yaml`` twin (removed when there are none)."""
    n = sum(isinstance(c, int) for c in cands)
    names = [str(c) for c in cands[n:]]
    write_yaml(path, {k: list(v[:n]) for k, v in values.items()})
    side = formats_twin(path)
    if names:
        write_yaml(side, {k: dict(zip(names, v[n:])) for k, v in values.items()})
    elif side.is_file():
        side.unlink()


def _read_mixdq(path: str | Path, n_bits: int) -> dict[str, list[float]]:
    """A MixDQ sensitivity yaml: {layer: [metric at each candidate bit]}."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise MpqError(
            f"{path}: a sensitivity file maps layer name -> list of {n_bits} values; delete it and re-run `mpq "
            "sensitivity`"
        )
    out: dict[str, list[float]] = {}
    for name, values in data.items():
        if not isinstance(values, list) or len(values) != n_bits:
            raise MpqError(
                f"{path}: layer '{name}' has {values!r}; expected a list of {n_bits} values (one per candidate bit); "
                "fix it, or delete it and re-run `mpq sensitivity`"
            )
        out[str(name)] = _scores(
            values,
            f"{path}: layer '{name}'",
            values,
            "fix it, or delete it and re-run `mpq sensitivity`",
            "re-run the sensitivity stage",
        )
    return out


def _scores(raw: list[Any], where: str, shown: Any, fix_type: str, fix_value: str) -> list[float]:
    """Scores as numbers, +inf SQNR clipped to :data:`MAX_SQNR_DB`; a non-numeric, NaN or -inf one is a one-line
    error (``where`` has ``shown``; ``fix_type`` / ``fix_value`` say what to do)."""
    try:
        vals = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise MpqError(f"{where} has non-numeric values {shown!r}; {fix_type}") from None
    if any(math.isnan(v) or v == -math.inf for v in vals):
        raise MpqError(f"{where} has values {shown!r}; {fix_value}")
    return [min(v, MAX_SQNR_DB) for v in vals]


def read_ratio_file(path: str | Path, names: Iterable[str]) -> dict[str, float]:
    """A MixDQ tensor-size file: {layer: size relative to ``conv_in``}; every layer of ``names`` must have one."""
    ratios = read_yaml(path)
    if not isinstance(ratios, dict) or not ratios:
        raise MpqError(f"{path}: a tensor-size file maps layer name -> relative size")
    unknown = [n for n in names if n not in ratios]
    if unknown:
        raise MpqError(f"{path} has no size for layer '{unknown[0]}' named in a sensitivity file")
    try:
        return {str(k): float(v) for k, v in ratios.items()}
    except (TypeError, ValueError):
        raise MpqError(f"{path}: a size is not a number; fix the file") from None
