"""``mpq trace``: where a quantized pipeline (a plan in fake-quant, or an exported folder) departs from FP.

Both pipelines run on identical inputs: the same prompt embeddings path, the same seeded CPU generator (so the same
initial latents and the same per-step noise, drawn in the same order), the same sampling settings. Three passes:

1. **FP**, recording every component call's inputs and outputs and every traced layer's output; for the *isolated*
   layer view each quantized layer is also run, inside the hook, on the FP input it just received (its own error).
2. **End to end**: the quantized pipeline on its own outputs; each component call and layer call compared with the
   FP one of the same index (how error accumulates over layers and steps).
3. **Isolated** (components): the quantized pipeline again, but every component's output is replaced by the FP one
   once measured, so that each component and step is fed the FP inputs (checked: ``fed_fp``). The denoiser's own
   prediction is kept, so the scheduler row is the latent error of that step's prediction alone (a multistep
   scheduler's history then holds the earlier steps' predictions too).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mpq.errors import MpqError
from mpq.images import PromptEmbeddings, generate, to_array
from mpq.metrics import ErrorStats, image_mse
from mpq.models import denoiser_name
from mpq.plan import BitPlan
from mpq.quant.steps import StepGroupHook, grouped
from mpq.quant.structure import quantizable_modules
from mpq.runner.patterns import search_names
from mpq.trace.capture import CallId, replace_tensors, tracing
from mpq.trace.files import TRACE_FORMAT

MODES = ("end_to_end", "isolated")


@dataclass
class Sides:
    """The FP pipeline and the quantized one (the same object for a fake-quant plan, switched by ``to_fp`` /
    ``to_quant``), and the quantized twin of a layer as a function of its input."""

    label: str
    fp_pipe: Any
    quant_pipe: Any
    fp_layers: dict[str, nn.Module]
    quant_layers: dict[str, nn.Module]
    quant_layer: Callable[[str, torch.Tensor], torch.Tensor]
    to_fp: Callable[[], None] = lambda: None
    to_quant: Callable[[], None] = lambda: None
    describe: dict[str, Any] = field(default_factory=dict)


def plan_sides(cfg: DictConfig, run: Any, plan: BitPlan, label: str) -> Sides:
    """A plan in fake-quant on the run's pipeline and checkpoint."""
    from mpq.calibration.checkpoint import quantized_pipeline

    pipe, qm, _ = quantized_pipeline(cfg, run)
    plan.validate(qm.names, qm.bits, formats=qm.formats)

    def quant_layer(name: str, x: torch.Tensor) -> torch.Tensor:
        return qm.layers[name]._quant_forward(x, plan.weight.get(name), plan.act.get(name))

    layers = dict(qm.layers)
    return Sides(
        label,
        pipe,
        pipe,
        layers,
        layers,
        quant_layer,
        qm.set_fp,
        lambda: qm.apply(plan),
        {"kind": "plan", "plan": label, "weight_layers": len(plan.weight), "act_layers": len(plan.act)},
    )


def export_sides(cfg: DictConfig, folder: str | Path, dtype: torch.dtype) -> Sides:
    """An ``mpq export`` folder (loaded packed, computing in ``dtype``) against the run's FP pipeline."""
    from mpq.export.mpq_format import load_quantized
    from mpq.models import denoiser_of, load_pipeline

    fp = load_pipeline(cfg, dtype=torch.float32)
    check_export_source(Path(folder), cfg, denoiser_of(fp))
    quant = load_quantized(folder, dtype=dtype, device=fp.device)
    qden = denoiser_of(quant)
    fp_layers = quantizable_modules(denoiser_of(fp))
    quant_layers: dict[str, nn.Module] = {}
    for name in fp_layers:
        try:
            quant_layers[name] = qden.get_submodule(name.split(".", 1)[1])
        except AttributeError:
            raise MpqError(
                f"{folder}: the export has no layer {name} of the run's model; trace an export of this run's model"
            ) from None

    if any(grouped(m) for m in qden.modules()):  # each FP call's timestep picks the export's step group
        denoiser_of(fp).register_forward_pre_hook(StepGroupHook(qden), with_kwargs=True)

    def quant_layer(name: str, x: torch.Tensor) -> torch.Tensor:
        return quant_layers[name](x.to(dtype))

    return Sides(str(folder), fp, quant, fp_layers, quant_layers, quant_layer, describe={"kind": "export"})


def check_export_source(folder: Path, cfg: DictConfig, denoiser: nn.Module) -> None:
    """Refuse an export made from another model than the run's (another architecture, or other weights of the same
    one): its departures from this FP pipeline would measure the two models' difference, not the quantization. An
    export written before its source was recorded gets a note."""
    from mpq.export.folder import export_source
    from mpq.quant.model import fingerprint, same_weights, weights_sample

    if not (folder / "model_index.json").is_file():
        return  # not an export at all: loading it says so
    source = export_source(folder)
    if source is None:
        print(
            f"mpq: note: {folder} does not record the model it was exported from (an older export); the trace assumes "
            f"it is {cfg.model.id}",
            file=sys.stderr,
        )
        return
    if source.get("fingerprint") != fingerprint(denoiser) or not same_weights(
        source.get("weights_sample"), weights_sample(denoiser)
    ):
        raise MpqError(
            f"{folder} was exported from {source.get('model_id')}, not from this run's model ({cfg.model.id}): its "
            "weights differ; trace it against the run it was exported from (--base_path)"
        )


# ----------------------------------------------------------------------------- one pass
def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


@dataclass
class FpRecord:
    calls: dict[str, tuple[CallId, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(default_factory=dict)
    layer_out: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    layer_order: dict[str, int] = field(default_factory=dict)  # first call order in the FP run
    isolated_layers: dict[tuple[str, int], ErrorStats] = field(default_factory=dict)  # (name, step)
    image: Any = None
    seconds: float = 0.0


def _generate(pipe: Any, cfg: DictConfig, prompt: str, seed: int) -> Any:
    return generate(pipe, [prompt], [seed], cfg, batch_size=1, text=PromptEmbeddings(pipe, cfg))[0]


def _compare(outputs: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], where: str) -> ErrorStats:
    if set(outputs) != set(ref):
        odd = sorted(set(outputs) ^ set(ref))[0]
        raise MpqError(f"{where}: the quantized pipeline's tensor {odd} has no FP counterpart (or the reverse)")
    stats = ErrorStats()
    for k, t in outputs.items():
        if t.shape != ref[k].shape:
            raise MpqError(f"{where}: {k} has shape {list(t.shape)}, FP {list(ref[k].shape)}")
        stats.update(t, ref[k])
    return stats


def fp_pass(
    sides: Sides, cfg: DictConfig, prompt: str, seed: int, layers: list[str], isolated: bool, end_to_end: bool = True
) -> FpRecord:
    """The FP run, recorded; ``isolated``: each traced layer's quantized twin on the FP input too; ``end_to_end``:
    the traced layers' outputs kept for the end-to-end pass."""
    rec = FpRecord()

    def on_call(cid: CallId, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], obj: Any) -> None:
        rec.calls[cid.key] = (cid, {k: _keep(t) for k, t in inputs.items()}, {k: _keep(t) for k, t in outputs.items()})

    def on_layer(name: str, index: int, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
        rec.layer_order.setdefault(name, len(rec.layer_order))
        if end_to_end:
            rec.layer_out[(name, index)] = _keep(out)
        if isolated:
            with torch.no_grad():
                own = sides.quant_layer(name, x)
            rec.isolated_layers.setdefault((name, step), ErrorStats()).update(own, out)

    sides.to_fp()
    denoiser = denoiser_name(sides.fp_pipe.components)
    start = time.perf_counter()
    with tracing(sides.fp_pipe, denoiser, on_call, {n: sides.fp_layers[n] for n in layers}, on_layer):
        rec.image = _generate(sides.fp_pipe, cfg, prompt, seed)
    rec.seconds = time.perf_counter() - start
    return rec


@dataclass
class PassResult:
    components: list[dict[str, Any]]
    layers: dict[tuple[str, int], ErrorStats]
    image: Any
    seconds: float
    calls: list[tuple[CallId, dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def quant_pass(
    sides: Sides, cfg: DictConfig, prompt: str, seed: int, rec: FpRecord, layers: list[str], mode: str, keep: bool
) -> PassResult:
    """The quantized pipeline, end to end or isolated (see the module); ``keep``: its calls' tensors are returned
    (dumps)."""
    rows: list[dict[str, Any]] = []
    layer_stats: dict[tuple[str, int], ErrorStats] = {}
    kept: list[tuple[CallId, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    denoiser = denoiser_name(sides.quant_pipe.components)

    def on_call(cid: CallId, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], obj: Any) -> Any:
        if cid.key not in rec.calls:
            raise MpqError(f"the quantized pipeline made a call the FP one did not ({cid.key}); trace the same model")
        _, fp_in, fp_out = rec.calls[cid.key]
        stats = _compare(outputs, fp_out, cid.key)
        row = {"id": cid.key, "component": cid.component, "step": cid.step, **stats.as_dict()}
        if mode == "isolated":
            skip = ("input.0", "input.model_output") if cid.component == "scheduler" else ()
            row["fed_fp"] = all(
                k in fp_in and t.shape == fp_in[k].shape and ErrorStats().update(t, fp_in[k]).exact
                for k, t in inputs.items()
                if k not in skip
            )
        rows.append(row)
        if keep:
            kept.append((cid, {k: _keep(t) for k, t in inputs.items()}, {k: _keep(t) for k, t in outputs.items()}))
        if mode == "isolated" and cid.component != denoiser:
            return replace_tensors(obj, fp_out, "output")
        return None

    def on_layer(name: str, index: int, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
        ref = rec.layer_out.get((name, index))
        if ref is not None:
            layer_stats.setdefault((name, step), ErrorStats()).update(out, ref)

    sides.to_quant()
    start = time.perf_counter()
    traced = {n: sides.quant_layers[n] for n in layers} if mode == "end_to_end" else {}
    with tracing(sides.quant_pipe, denoiser, on_call, traced, on_layer if traced else None):
        image = _generate(sides.quant_pipe, cfg, prompt, seed)
    return PassResult(rows, layer_stats, image, time.perf_counter() - start, kept)


# ----------------------------------------------------------------------------- the trace
@dataclass
class TraceRequest:
    prompt: str
    seed: int
    modes: tuple[str, ...] = MODES
    layers: str | None = ""  # regex over layer names (search); None: no layer trace
    dump: Path | None = None


def _say(what: str) -> None:
    print(f"[trace] {what} ...", file=sys.stderr, flush=True)


def _layer_rows(stats: Mapping[tuple[str, int], ErrorStats], order: Mapping[str, int]) -> list[dict[str, Any]]:
    rows = [
        {"name": name, "order": order.get(name, -1), "step": step, **s.as_dict()} for (name, step), s in stats.items()
    ]
    return sorted(rows, key=lambda r: (r["step"], r["order"]))


def first_departure(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first layer (in execution order, earliest step first) whose output is not exactly FP's."""
    return next(({"name": r["name"], "step": r["step"], "sqnr_db": r["sqnr_db"]} for r in rows if r["mae"] > 0), None)


def run_trace(cfg: DictConfig, sides: Sides, req: TraceRequest) -> dict[str, Any]:
    """The trace as a JSON-able dict (see :mod:`mpq.trace.report` for the files), plus the dumped calls under
    ``"_calls"`` when ``req.dump``."""
    for m in req.modes:
        if m not in MODES:
            raise MpqError(f"unknown trace mode {m!r}; choose from {', '.join(MODES)}")
    layers: list[str] = []
    if req.layers is not None:
        layers = search_names(req.layers, sides.fp_layers, "--layers")
        if not layers:
            raise MpqError(f"--layers {req.layers!r} matches no layer (names look like {next(iter(sides.fp_layers))})")
    _say(f"FP pass ({len(layers)} layers traced)")
    rec = fp_pass(sides, cfg, req.prompt, req.seed, layers, "isolated" in req.modes, "end_to_end" in req.modes)
    out: dict[str, Any] = {
        "format": TRACE_FORMAT,
        "config": str(cfg.name),
        "model": str(cfg.model.id),
        "quantized": {"label": sides.label, **sides.describe},
        "prompt": req.prompt,
        "seed": req.seed,
        "steps": int(cfg.sampling.steps),
        "guidance_scale": float(cfg.sampling.guidance_scale),
        "modes": list(req.modes),
        "layers_traced": len(layers),
        "components": {},
        "layers": {},
        "first_departure": {},
        "seconds": {"fp": rec.seconds},
    }
    for mode in req.modes:
        _say(f"{mode.replace('_', '-')} pass")
        res = quant_pass(
            sides, cfg, req.prompt, req.seed, rec, layers, mode, keep=req.dump is not None and mode == "end_to_end"
        )
        out["components"][mode] = res.components
        out["seconds"][mode] = res.seconds
        stats = res.layers if mode == "end_to_end" else rec.isolated_layers
        out["layers"][mode] = _layer_rows(stats, rec.layer_order)
        out["first_departure"][mode] = first_departure(out["layers"][mode])
        if mode == "end_to_end":
            a, b = to_array([res.image]), to_array([rec.image])
            pixels = ErrorStats().update(torch.from_numpy(a), torch.from_numpy(b)).as_dict()
            out["image"] = {"mse": float(image_mse(a, b)[0]), **pixels}
            out["_images"] = {"fp": rec.image, "quantized": res.image}
            if req.dump is not None:
                out["_calls"] = res.calls
        if mode == "isolated":
            out["fed_fp"] = all(r.get("fed_fp", True) for r in res.components)
    sides.to_quant()
    _say("one plain generation (the cost reference)")
    start = time.perf_counter()
    _generate(sides.quant_pipe, cfg, req.prompt, req.seed)
    one = time.perf_counter() - start
    traced = sum(v for k, v in out["seconds"].items())
    out["seconds"].update({"one_generation": one, "trace_total": traced})
    out["cost_generations"] = traced / one if one > 0 else math.inf
    return out


def summary_lines(t: dict[str, Any], top: int = 6) -> list[str]:
    """The CLI's report: worst components and layers first."""

    def fmt(r: dict[str, Any]) -> str:
        return f"SQNR {r['sqnr_db']:7.2f} dB  cos {r['cos']:.6f}  MAE {r['mae']:.3g}  max {r['max_abs']:.3g}"

    def worst(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: (r["sqnr_db"], r.get("step") or 0))

    q = t["quantized"]
    lines = [
        f"trace of {q['label']} against FP: {t['config']}, prompt {t['prompt']!r}, seed {t['seed']}, {t['steps']} "
        f"steps, guidance {t['guidance_scale']:g}"
    ]
    if "image" in t:
        lines.append(f"image MSE vs FP (end to end): {t['image']['mse']:.6g}")
    for mode in t["modes"]:
        title = "end to end" if mode == "end_to_end" else "isolated (each fed the FP inputs)"
        lines.append(f"{title} - components, worst first:")
        departed = [r for r in t["components"][mode] if r["mae"] > 0]
        lines += [f"  {r['id']:<28} {fmt(r)}" for r in worst(departed)[:top]]
        if not departed:
            lines.append("  every component equals FP exactly")
        rows = t["layers"].get(mode, [])
        if rows:
            lines.append(f"{title} - layers, worst first ({len(rows)} layer calls):")
            lines += [f"  {r['name']} (step {r['step']}): {fmt(r)}" for r in worst(rows)[:top] if r["mae"] > 0]
            first = t["first_departure"].get(mode)
            lines.append(
                f"  first departure: {first['name']} at step {first['step']} (SQNR {first['sqnr_db']:.2f} dB)"
                if first
                else "  every traced layer equals FP exactly"
            )
    if "fed_fp" in t:
        lines.append(f"isolated mode fed every component the exact FP inputs: {'yes' if t['fed_fp'] else 'NO'}")
    s = t["seconds"]
    lines.append(
        f"cost: {s['trace_total']:.1f} s = {t['cost_generations']:.1f} generations (one generation "
        f"{s['one_generation']:.2f} s)"
    )
    return lines
