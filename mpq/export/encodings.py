"""The ``encodings`` export: per-tensor / per-channel encodings JSON in the layout of AIMET's encodings files.

::

    {"version": "0.6.1",
     "activation_encodings":
     {"<module>.input": [{"bitwidth", "dtype", "is_symmetric", "min", "max", "offset", "scale"}]},
     "param_encodings":      {"<module>.weight": [one entry per output channel]},
     "excluded_layers": [FP layers], "quantizer_args": {...}, "mpq": {...}}

Conventions are AIMET's: ``real = (q + offset) * scale``, so ``offset = -zero_point``; ``is_symmetric`` is
the string "True"/"False"; ``min = offset * scale``, ``max = (offset + 2^b - 1) * scale``. A split input
(``in_split``) has one activation entry per part (``<module>.input`` holds the parts in order) and its
weight one entry per (part, output channel), part-major; ``mpq.in_split`` gives the channel ranges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.plan import BitPlan
from mpq.quant.formats import Format, IntGrid
from mpq.quant.model import PREFIX, QuantModel
from mpq.quant.quantizer import qrange
from mpq.runner.files import write_json

VERSION = "0.6.1"


def encoding(scale: float, zero_point: float, bits: int, symmetric: bool) -> dict[str, Any]:
    """One AIMET encoding entry for a quantizer with ``scale`` and ``zero_point`` on the ``bits`` grid."""
    qmin, qmax = qrange(bits, symmetric)
    offset = int(qmin if symmetric else -round(zero_point))
    return {
        "bitwidth": bits,
        "dtype": "int",
        "is_symmetric": str(symmetric),
        "min": (offset) * scale,
        "max": (offset + (qmax - qmin)) * scale,
        "offset": offset,
        "scale": scale,
    }


def aimet_grid(fmt: Format, layer: str) -> IntGrid:
    """The integer grid of ``layer``'s weight format, when AIMET's weight encodings (symmetric integer scales per
    output channel) hold it; else a one-line error saying what to do."""
    grid = fmt.grid
    if grid is None:
        raise MpqError(
            f"the encodings format holds integer weight scales; layer {layer} is planned in {fmt.name}; export with "
            "--format mpq"
        )
    if not grid.symmetric_channel:
        raise MpqError(
            f"the encodings format holds symmetric per-channel weight scales; layer {layer}'s weights, planned at "
            f"{fmt.name}, have {grid.wq.label} scales; export with --format mpq, or {grid.remedy}"
        )
    return grid


def plan_encodings(qm: QuantModel, plan: BitPlan) -> dict[str, Any]:
    acts: dict[str, list[dict[str, Any]]] = {}
    step_acts: dict[str, list[list[dict[str, Any]]]] = {}  # per step group (timestep-aware ranges), mpq's section
    bounds: list[float] = []
    params: dict[str, list[dict[str, Any]]] = {}
    splits: dict[str, list[int]] = {}
    excluded = []
    for name, layer in qm.layers.items():
        path = name[len(PREFIX) :]
        w, a = plan.weight.get(name), plan.act.get(name)
        if w is None and a is None:
            excluded.append(path)
        if layer.n_parts > 1:
            splits[path] = list(layer.in_split)
        if w is not None:
            fmt = layer.weight_format(w)
            grid = aimet_grid(fmt, name)
            scale = layer.format_params(fmt)["scale"]  # (rows, groups): one group per input part, per channel
            params[f"{path}.weight"] = [
                encoding(float(s), 0.0, grid.bits, True) for part in scale.t().tolist() for s in part
            ]
        if a is not None:
            k = layer.bits.index(a)
            acts[f"{path}.input"] = [
                encoding(float(layer.a_scale[k, p]), float(layer.a_zero[k, p]), a, layer.a_symmetric)
                for p in range(layer.n_parts)
            ]
            if layer.step_groups > 1:
                bounds = layer.step_bounds()
                scales, zeros = layer.a_step_scale[:, k].tolist(), layer.a_step_zero[:, k].tolist()
                step_acts[f"{path}.input"] = [
                    [encoding(s, z, a, layer.a_symmetric) for s, z in zip(gs, gz)] for gs, gz in zip(scales, zeros)
                ]
    steps = (
        {
            "step_groups": {
                "groups": len(bounds) + 1,
                "timestep_bounds": bounds,
                "activation_encodings": step_acts,
                "note": "AIMET holds one encoding per tensor: activation_encodings are the all-steps ranges; a "
                "runtime with per-step ranges takes group g (timesteps between bounds[g-1] and bounds[g]) from here",
            }
        }
        if step_acts
        else {}
    )
    return {
        "version": VERSION,
        "activation_encodings": acts,
        "param_encodings": params,
        "excluded_layers": excluded,
        "quantizer_args": {
            "per_channel_quantization": True,
            "param_is_symmetric": True,
            "activation_is_symmetric": any(layer.a_symmetric for layer in qm.layers.values()),
            "quant_scheme": "min_max",
            "dtype": "int",
        },
        "mpq": {
            "in_split": splits,
            "bos_fp": sorted(n[len(PREFIX) :] for n, layer in qm.layers.items() if layer.bos_aware),
            "act_protected": sorted(n[len(PREFIX) :] for n in plan.protected),
            **steps,
        },
    }


def export_encodings(qm: QuantModel, plan: BitPlan, folder: Path, component: str = "unet") -> dict[str, Any]:
    """``<component>.encodings`` (``unet.encodings``, ``transformer.encodings``) in ``folder``."""
    data = plan_encodings(qm, plan)
    write_json(folder / f"{component}.encodings", data)
    return {
        "activations": len(data["activation_encodings"]),
        "params": len(data["param_encodings"]),
        "step_groups": data["mpq"].get("step_groups", {}).get("groups", 1),
        "file": f"{component}.encodings",
    }
