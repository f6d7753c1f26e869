"""MixDQ's search inputs: sensitivity files and tensor-size ("ratio") files.

A sensitivity file maps layer -> [metric at each candidate bit]; a ratio file
maps layer -> its tensor size relative to ``conv_in``. In MixDQ-file mode the
layers come from these files alone: content = the layers of the SSIM file,
sizes = the ratios (so "bytes" are in ratio units).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from mpq.errors import MpqError
from mpq.runner.files import read_yaml

MAX_SQNR_DB = 150.0  # +inf SQNR (a bit-exact layer) is clipped here: fp32 carries ~150 dB


def read_sensitivity(path: str | Path, n_bits: int) -> dict[str, list[float]]:
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
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError):
            raise MpqError(
                f"{path}: layer '{name}' has non-numeric values {values!r}; fix it, or delete it and re-run `mpq "
                "sensitivity`"
            ) from None
        if any(math.isnan(v) or v == -math.inf for v in vals):
            raise MpqError(f"{path}: layer '{name}' has values {values!r}; re-run the sensitivity stage")
        out[str(name)] = [min(v, MAX_SQNR_DB) for v in vals]
    return out


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
