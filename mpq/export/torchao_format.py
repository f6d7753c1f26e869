"""The ``torchao`` export path: a plan as a torchao ``FqnToConfig``, applied with ``torchao.quantize_``.

Per layer (names are the denoiser's module paths):

* W8A8 Linear (a weight format whose ``torchao_w8a8`` says so: the checkpoint's 8-bit integers) ->
  ``Int8DynamicActivationInt8WeightConfig`` (int8 weights, int8 activations quantized dynamically per token:
  torchao's scales, not mpq's static per-tensor ones);
* any other weight on a uniform integer grid (a format's ``grid``; Linear or Conv2d) ->
  ``IntxWeightOnlyConfig(int<b>, PerAxis(0) or PerGroup)``, the grid's levels, activations FP (torchao has no
  static activation quantizer);
* FP weights, and formats that are no integer grid (``nf<k>``, ``fp8``) -> no entry.

What torchao could not take as planned is listed per layer and summed per layer kind: activation bits
dropped, W8A8 convolutions run weight-only, split inputs (one scale per channel over the whole input,
mpq has one per part). torchao is an optional dependency (``pip install mpq[torchao]``).

``torchao_config.json`` also records the denoiser's pipeline component and the ``torch_dtype`` to load with (the
dtype the export's model computed in). Two ways to apply it: :func:`load_torchao` (``quantize_`` on a loaded
pipeline: Linear and Conv2d), or ``DiffusionPipeline.from_pretrained(<the FP model>, **from_pretrained_kwargs(DIR))``
(diffusers' ``TorchAoConfig`` through ``PipelineQuantizationConfig``: its quantizer converts ``nn.Linear`` weights
only, so Conv2d layers stay FP; ``torch_dtype`` must be passed, diffusers' torchao default is bfloat16 for the
denoiser alone and the fp32 components then fail with a dtype mismatch). ``from_pretrained_layers`` in the json
counts what that path quantizes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.plan import BitPlan
from mpq.quant.formats import resolve
from mpq.quant.model import PREFIX, QuantModel
from mpq.runner.files import write_csv, write_json

COLUMNS = ["layer", "kind", "w_bits", "a_bits", "torchao", "note"]


def _torchao() -> Any:
    try:
        import torchao.quantization as tq
    except ImportError:
        raise MpqError(
            "the torchao path needs torchao: `pip install torchao` (or `pip install -e '.[torchao]'`)"
        ) from None
    return tq


def torchao_plan(qm: QuantModel, plan: BitPlan) -> tuple[Any, list[dict[str, Any]]]:
    """(``FqnToConfig``, one row per quantizable layer saying what torchao takes and what it drops)."""
    tq = _torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    configs: dict[str, Any] = {}
    rows = []
    for name, layer in qm.layers.items():
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        w, a = plan.weight.get(name), plan.act.get(name)
        key, notes = w, []
        fmt = None if w is None else resolve(w, layer.wq)
        grid = None if fmt is None else fmt.grid
        if fmt is None or grid is None:
            choice = "FP"
            if fmt is not None:
                notes.append(f"{w} kept FP: no torchao config stores it (`mpq export --format mpq` packs it)")
            if a is not None:
                notes.append(f"A{a} dropped: torchao has no activation-only config")
        elif fmt.torchao_w8a8 and a == 8 and kind == "linear":
            configs[name[len(PREFIX) :]] = tq.Int8DynamicActivationInt8WeightConfig()
            choice = "Int8DynamicActivationInt8WeightConfig"
            notes.append("activations per token, dynamic (mpq: per tensor, static)")
        else:
            wq = grid.wq
            grouped = wq.granularity == "group" and kind == "linear" and layer.weight.shape[1] % wq.group_size == 0
            configs[name[len(PREFIX) :]] = tq.IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, f"int{grid.bits}"),
                granularity=PerGroup(wq.group_size) if grouped else PerAxis(0),
                mapping_type=MappingType.ASYMMETRIC if wq.asymmetric else MappingType.SYMMETRIC,
            )
            choice = f"IntxWeightOnlyConfig(int{grid.bits}{f', group {wq.group_size}' if grouped else ''})"
            if (wq.granularity == "kernel" and kind == "conv") or (wq.granularity == "group" and not grouped):
                notes.append(f"{wq.granularity} scales become per channel: torchao has no {kind} {wq.granularity}s")
            if a is not None:
                notes.append(
                    f"A{a} dropped"
                    + (
                        ": int8 dynamic activation has no Conv2d handler"
                        if a == 8 and fmt.torchao_w8a8
                        else ": weight-only"
                    )
                )
        if w is not None and layer.n_parts > 1:
            notes.append("split input: one scale per channel over both parts")
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "w_bits": key or "",
                "a_bits": a or "",
                "torchao": choice,
                "note": "; ".join(notes),
            }
        )
    return tq.FqnToConfig(configs), rows


def support_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per layer kind: layers taken as planned, taken with a change (activation dropped, ...), kept FP by the plan."""
    out: dict[str, Counter[str]] = {}
    for r in rows:
        c = out.setdefault(r["kind"], Counter())
        c["fp_in_plan"] += r["torchao"] == "FP" and not r["note"]
        c["as_planned"] += r["torchao"] != "FP" and not r["note"]
        c["changed"] += bool(r["note"])
    return {k: dict(v) for k, v in out.items()}


def apply_torchao(denoiser: nn.Module, fqn_config: Any) -> None:
    """``torchao.quantize_`` with the plan's ``FqnToConfig`` (in place)."""
    tq = _torchao()
    tq.quantize_(denoiser, fqn_config, filter_fn=None)


def from_pretrained_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Layers per torchao config as diffusers' ``TorchAoConfig`` path applies the plan (it converts ``nn.Linear``
    weights only: Conv2d layers stay FP whatever the plan), and ``FP`` for those left as they are."""
    out: Counter[str] = Counter()
    for r in rows:
        out[r["torchao"].split("(")[0] if r["kind"] == "linear" else "FP"] += 1
    return dict(sorted(out.items()))


def export_torchao(
    qm: QuantModel, plan: BitPlan, out: Path, model_id: str, torch_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Write ``torchao_config.json`` (the serialized ``FqnToConfig``, the denoiser's component and the
    ``torch_dtype`` to load with: ``torch_dtype``, default the denoiser's), ``torchao_layers.csv`` and
    ``torchao_summary.json`` into ``out``; :func:`load_torchao` applies them to the FP pipeline."""
    from torchao.core.config import config_to_dict

    from mpq.families import family_of

    fqn, rows = torchao_plan(qm, plan)
    dtype = torch_dtype or next(qm.denoiser.parameters()).dtype
    diffusers_counts = from_pretrained_counts(rows)
    write_json(
        out / "torchao_config.json",
        {
            "model_id": model_id,
            "component": family_of(qm.denoiser).component,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "from_pretrained_layers": diffusers_counts,
            "fqn_to_config": config_to_dict(fqn),
        },
    )
    write_csv(out / "torchao_layers.csv", rows, COLUMNS)
    summary = support_summary(rows)
    write_json(out / "torchao_summary.json", summary)
    return {"summary": summary, "layers": len(rows), "from_pretrained_layers": diffusers_counts}


def _read_export(out: str | Path) -> tuple[dict[str, Any], torch.dtype | None]:
    """(``torchao_config.json``, its ``torch_dtype``: None for an export that predates the field)."""
    from mpq.runner.files import read_json

    path = Path(out) / "torchao_config.json"
    data = read_json(path)
    if "torch_dtype" not in data:
        return data, None
    name = data["torch_dtype"]
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MpqError(f"{path}: torch_dtype {name!r} is not a floating torch dtype; re-export with `mpq export`")
    return data, dtype


def load_torchao(out: str | Path, pipe: Any, dtype: torch.dtype | None = None) -> Any:
    """Apply an exported ``torchao_config.json`` to ``pipe``'s denoiser (``quantize_``, in place); returns ``pipe``.
    The pipeline computes in ``dtype`` (default: the export's ``torch_dtype``; an older export's: as it is): cast
    first where it differs."""
    from torchao.core.config import config_from_dict

    from mpq.models import denoiser_of

    data, recorded = _read_export(out)
    dtype = dtype or recorded
    denoiser = denoiser_of(pipe)
    if dtype is not None and next(denoiser.parameters()).dtype != dtype:
        pipe.to(dtype=dtype)
    apply_torchao(denoiser, config_from_dict(data["fqn_to_config"]))
    return pipe


def from_pretrained_kwargs(out: str | Path, torch_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``quantization_config`` and ``torch_dtype`` for ``DiffusionPipeline.from_pretrained(<the FP model>, **...)``:
    diffusers' ``TorchAoConfig`` with the exported ``FqnToConfig`` for the denoiser's component (``nn.Linear``
    layers only: Conv2d stays FP), every component in the export's ``torch_dtype`` (or ``torch_dtype``)."""
    _torchao()  # one line where torchao is missing
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.core.config import config_from_dict

    data, recorded = _read_export(out)
    config = TorchAoConfig(config_from_dict(data["fqn_to_config"]))
    return {
        "quantization_config": PipelineQuantizationConfig(quant_mapping={data.get("component", "unet"): config}),
        "torch_dtype": torch_dtype or recorded or torch.float32,  # older exports: computed in fp32 too
    }
