"""A trace's files: ``trace.json`` (numbers; +inf SQNR written as the string "inf"), the two plots, and the FP and
quantized images of the traced prompt."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.runner.files import read_json, write_json, write_with
from mpq.runner.outputs import OutputKind, json_field

TRACE_JSON = "trace.json"
TRACE_FORMAT = "mpq-trace/1"
PLOTS = ("trace_layers.png", "trace_components.png")
TRACE = OutputKind(
    "trace folder",
    (TRACE_JSON, *PLOTS, "image_*.png"),
    lambda folder: json_field(folder / TRACE_JSON, "format") == TRACE_FORMAT,
)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _from_json(v: Any) -> Any:
    if v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, dict):
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def write_trace(out: str | Path, trace: dict[str, Any]) -> list[Path]:
    """trace.json, the plots and the two images into ``out``; each file written atomically."""
    from mpq.report.plots import plot_trace_components, plot_trace_layers

    out = Path(out)
    data = {k: v for k, v in trace.items() if not k.startswith("_")}
    paths = [out / TRACE_JSON]
    write_json(paths[0], _json_safe(data))
    if any(data["layers"].get(m) for m in data["modes"]):
        paths.append(plot_trace_layers(data, out / PLOTS[0]))
    paths.append(plot_trace_components(data, out / PLOTS[1]))
    for label, image in trace.get("_images", {}).items():
        path = out / f"image_{label}.png"
        write_with(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def read_trace(path: str | Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise MpqError(f"{path}: not an mpq trace; re-run `mpq trace`")
    return _from_json(data)
