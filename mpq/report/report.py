"""The run report: a static ``report/index.html`` (no server) and ``report/summary.json``.

The evidence is measured on the evaluation prompts (:mod:`mpq.report.evaluate`):
FP, uniform W8A8 / W4A8 / W4A16 / W2A16 (where calibrated), the best mixed
weight plan with no more weight bytes than uniform W4 (activations FP), and the
chosen W/A plan: weight bytes, MSE / SSIM / PSNR vs FP and, for the embedded
shapes model, prompt adherence. The mixed plan is picked on the selection
images, so on held-out evaluation prompts its score is not fitted to them.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mpq.calibration.checkpoint import quantized_pipeline, run_layers
from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.images import load_images, to_array
from mpq.layers import LayerInfo
from mpq.metrics import image_mse
from mpq.plan import BitPlan, final_plan, plan_file, read_plan
from mpq.quant.model import QuantModel
from mpq.report.evaluate import calibration_set, eval_set, evaluate_plans, slug
from mpq.report.plots import plot_pareto, plot_peers, plot_selection, plot_sensitivity
from mpq.runner.choices import KINDS, METRICS
from mpq.runner.files import write_json, write_text, write_with
from mpq.runner.rundir import RunDir
from mpq.search.candidates import read_candidates
from mpq.search.mixdq_files import read_sensitivity
from mpq.selection import Score, budget_curve, read_scores, refine_summary
from mpq.shapes.data import ATTRIBUTES

MIXED_W = "mixed W, A16"  # the best mixed weight plan with no more bytes than uniform W4, activations FP
CHOSEN = "chosen"
SHOWN_IMAGES = 8


def final_mse(run: RunDir, n: int) -> float:
    gen = sorted(run.generated_images.glob("*.png"))[:n]
    refs = [run.fp_image(p.name) for p in gen]
    return float(np.mean(image_mse(to_array(load_images(gen)), to_array(load_images(refs)))))


def _sensitivity_tables(run: RunDir, n_bits: int) -> dict[str, dict[str, list[float]]]:
    out = {}
    for kind in KINDS:
        for metric in METRICS:
            path = run.sensitivity_file(kind, metric)
            if path.is_file() and path.stat().st_size > 3:  # an empty file: a skipped metric of a layer subset
                out[f"{kind}_{metric}"] = read_sensitivity(path, n_bits)
    return out


def ssim_spread(tables: dict[str, dict[str, list[float]]], bits: list[int]) -> dict[str, dict[str, list[float]]]:
    """Per kind and candidate bit: min, median, max of the content layers' SSIM sensitivity."""
    out: dict[str, dict[str, list[float]]] = {}
    for kind in KINDS:
        if f"{kind}_ssim" in tables:
            table = np.array(list(tables[f"{kind}_ssim"].values()), dtype=np.float64)
            out[kind] = {
                str(b): [float(table[:, k].min()), float(np.median(table[:, k])), float(table[:, k].max())]
                for k, b in enumerate(bits)
            }
    return out


def _scores(run: RunDir, kind: str) -> list[Score]:
    path = run.scores(kind)
    return read_scores(path) if path.is_file() else []


def mixed_weight_pick(rows: list[Score], w4_bytes: float | None) -> str | None:
    """The selection's best weight candidate with no more weight bytes than uniform W4 (lowest MSE; ties: fewer bytes,
    then the file name), or None."""
    fits = [r for r in rows if w4_bytes is not None and r.bytes <= w4_bytes * (1 + 1e-9)]
    return min(fits, key=lambda r: (r.mse, r.bytes, r.plan_file)).plan_file if fits else None


def uniform_selection_points(
    cfg: DictConfig, run: RunDir, pipe: Any, qm: QuantModel, infos: list[LayerInfo], cost: CostModel, final: BitPlan
) -> dict[str, list[dict[str, Any]]]:
    """Uniform reference plans scored like the candidates, on the selection images: W8/W4/W2 (activations FP) for the
    weight plot, A8/A4 on top of the chosen weight plan for the act plot. {kind: [{label, bytes, mse}]}"""
    data = calibration_set(run, cfg.select.num_images, "select.num_images")
    plans: dict[str, tuple[str, BitPlan]] = {}
    for b in (8, 4, 2):
        if b in qm.bits:
            plans[f"W{b}"] = ("weight", BitPlan.uniform(qm.names, b, None))
    for b in (8, 4):
        if b in qm.bits:
            plans[f"A{b}"] = ("act", BitPlan(final.weight, BitPlan.uniform(qm.names, None, b).act))
    results = evaluate_plans(cfg, pipe, qm, {k: p for k, (_, p) in plans.items()}, data, None, with_fp=False)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for label, (kind, plan) in plans.items():
        c = cost.plan_cost(plan, infos)
        out[kind].append(
            {"label": label, "bytes": c.weight_bytes if kind == "weight" else c.act_bytes, "mse": results[label]["mse"]}
        )
    return out


def peer_results(cfg: DictConfig, run: RunDir) -> dict[str, Any] | None:
    """``eval.peers`` (a peer benchmark's ``peers.json``) drawn into ``report/peers.png``: its byte levels and tools,
    or None when not given."""
    if not cfg.eval.peers:
        return None
    from mpq.runner.files import read_json

    path = Path(cfg.eval.peers)
    path = path / "peers.json" if path.is_dir() else path
    if not path.is_file():
        raise MpqError(f"eval.peers={cfg.eval.peers}: no such file; run `python benchmarks/bench_peers.py --out DIR`")
    data = read_json(path)
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not all(
        isinstance(p, dict) and {"tool", "bytes", "mean_mse"} <= set(p) for p in points
    ):
        raise MpqError(f"{path} is not a peer benchmark's peers.json (no points with tool, bytes, mean_mse); re-run it")
    plot_peers(points, run.peers_plot, f"{data.get('config', '')}: peers, weight-only ({path.name})")
    return {"source": str(path), "levels": data.get("levels", []), "n_images": data.get("n_images")}


def format_shares(plan: BitPlan, infos: list[LayerInfo]) -> dict[str, dict[str, float]]:
    """{bits or format: {layers, weight share}} of a plan's weights ("FP": the layers it keeps FP)."""
    total = sum(i.weight_numel for i in infos) or 1
    out: dict[str, dict[str, float]] = {}
    for i in infos:
        key = str(plan.weight.get(i.name, "FP"))
        row = out.setdefault(key, {"layers": 0, "weight_share": 0.0})
        row["layers"] += 1
        row["weight_share"] += i.weight_numel / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["weight_share"]))


def build_report(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> Path:
    """Evaluate FP, uniform and chosen plans on the evaluation prompts; plots; summary.json; index.html."""
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    bits = list(manifest["bits"])
    infos = run_layers(cfg, run)
    cost = CostModel.from_config(cfg)
    final = final_plan(run)
    plans: dict[str, BitPlan] = {}
    for label, wb, ab in (("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A16", 4, None), ("W2A16", 2, None)):
        if wb in bits and (ab is None or ab in bits):
            plans[label] = BitPlan.uniform(qm.names, wb, ab)
    for fmt in qm.formats:  # the calibrated weight formats, uniform, activations FP (compare with W4A16)
        plans[f"W{fmt}A16"] = BitPlan.uniform(qm.names, fmt, None)
    w4_bytes = cost.plan_cost(BitPlan.uniform(qm.names, 4, None), infos).weight_bytes if 4 in bits else None
    scores = {k: _scores(run, k) for k in KINDS}
    mixed = mixed_weight_pick(scores["weight"], w4_bytes)
    if mixed:
        plans[MIXED_W] = BitPlan(read_plan(run.scored_plan("weight", mixed)))
    plans[CHOSEN] = final
    data = eval_set(cfg, run, pipe, run.report_images / slug("FP"))  # beside each plan's: report_images/<slug>
    results = evaluate_plans(cfg, pipe, qm, plans, data, run.report_images)
    for label, res in results.items():
        res.update(cost.plan_cost(plans.get(label, BitPlan()), infos).as_dict())
    export = exported_sizes(cfg, pipe, qm, plans, results, cost)
    tables = _sensitivity_tables(run, len(bits))
    groups = {i.name: i.group for i in infos}
    for key, values in tables.items():
        kind, metric = key.split("_")
        plot_sensitivity(run.sensitivity_plot(kind, metric), kind, metric, values, bits, groups)
    chosen = {k: next((r.plan_file for r in scores[k] if r.chosen), "") for k in KINDS}
    candidates = read_candidates(run.require(run.candidate_table, f"run `mpq search --base_path {run.root}` first"))
    plot_pareto(candidates, run.pareto_plot, chosen)
    uniform = uniform_selection_points(cfg, run, pipe, qm, infos, cost, final)
    curves = {k: budget_curve(k, scores[k]) for k in KINDS}
    plot_selection(scores, uniform, run.selection_plot, curves)
    peers = peer_results(cfg, run)
    summary: dict[str, Any] = cost.plan_cost(final, infos).as_dict()
    summary.update(
        {
            "fp_dtype_bytes": cost.fp_bytes,
            "act_protected": len(final.protected),
            "chosen": chosen,
            "final_mse": final_mse(run, cfg.infer.num_images),
            "eval_prompts": {"source": cfg.eval.prompts_file or "calibration prompts", "n": len(data.prompts)},
            "eval": results,
            "mixed_weight_plan": mixed,
            "selection_uniform": uniform,
            "budget_curves": {k: [asdict(p) for p in c] for k, c in curves.items()},
            "weight_refine": refine_summary(run),
            "ssim_sensitivity_spread": ssim_spread(tables, bits),
            "export": export,
            "peers": peers,
        }
    )
    if qm.formats:
        summary["weight_formats"] = format_shares(final, infos)
    write_json(run.summary, summary)
    write_text(run.report_page, _html(cfg, run, data.prompts, summary, scores["weight"]))
    return run.report_page


def exported_sizes(
    cfg: DictConfig, pipe: Any, qm: Any, plans: dict[str, BitPlan], results: dict[str, Any], cost: CostModel
) -> dict[str, Any]:
    """Each evaluated plan exported in the ``mpq`` format (FP parts FP16), in memory: the denoiser file's bytes, and
    its quantizable layers' weight bytes next to the cost model's (which prices scales at ``search.scale_bytes``
    and FP weights at the model dtype; the export keeps scales fp32 and FP weights fp16)."""
    import torch

    from mpq.export.mpq_format import (
        capture_bos_rows,
        denoiser_export,
        serialized_bytes,
        weight_bytes_of,
    )
    from mpq.quant.structure import PREFIX

    bos = capture_bos_rows(pipe, qm, cfg)
    paths = [n[len(PREFIX) :] for n in qm.names]
    for label, res in results.items():  # "FP" (no plan) is the FP16 denoiser
        plan = plans.get(label, BitPlan())
        if not all(cost.format(k).packs for k in plan.weight.values()):  # a runtime's format (SDNQ): its own export
            continue
        tensors = denoiser_export(qm, plan, torch.float16, bos)[0]
        res["export_file_bytes"] = serialized_bytes(tensors)
        res["export_weight_bytes"] = weight_bytes_of(tensors, paths)
        # where the stored bytes differ from the priced ones: the scales (stored fp32) and the FP weights (stored fp16)
        stored = priced = 0.0
        for name, layer in qm.layers.items():
            key, shape = plan.weight.get(name), tuple(layer.weight.shape)
            if key is not None:  # the weight's parameters as stored (fp32) and as priced
                stored += layer.weight_format(key).param_bytes(shape, layer.in_split, 4)
                priced += cost.format(key).param_bytes(shape, layer.in_split, cost.scale_bytes)
        n_fp = sum(layer.weight.numel() for name, layer in qm.layers.items() if name not in plan.weight)
        res["export_scale_extra_bytes"] = stored - priced
        res["export_fp_weight_extra_bytes"] = n_fp * (2 - cost.fp_bytes)
    return {
        "format": "mpq",
        "fp_dtype": "float16",
        "scale_dtype": "float32",
        "fp16_denoiser_bytes": results["FP"]["export_file_bytes"],
        "scale_bytes_counted": cost.scale_bytes,
        "fp_bytes_counted": cost.fp_bytes,
    }


SUMMARY_KEYS = (
    "weight_avg_bits",
    "act_avg_bits",
    "weight_bytes",
    "fp_weight_bytes",
    "fp_dtype_bytes",
    "act_protected",
    "final_mse",
    "eval",
    "eval_prompts",
)


def read_summary(run: RunDir) -> dict[str, Any]:
    """``report/summary.json``, checked: a damaged file is a one-line error naming it and the fix."""
    from mpq.runner.files import read_json

    path = run.require(run.summary, f"run `mpq report --base_path {run.root}` first")
    s = read_json(path)
    missing = [k for k in SUMMARY_KEYS if not isinstance(s, dict) or k not in s]
    if missing:
        raise MpqError(
            f"{path} has no '{missing[0]}' (damaged, or from another mpq version); run `mpq report --force --base_path "
            f"{run.root}`"
        )
    return s


def bits_text(avg: float, fp_layers: int) -> str:
    """'4.00', '7.50 + 2 FP layers' or 'FP': average bits over the quantized layers, the FP ones counted apart."""
    if math.isnan(avg):
        return "FP"
    return f"{avg:.2f}" + (f" + {fp_layers} FP layers" if fp_layers else "")


def summary_lines(run: RunDir, s: dict[str, Any]) -> list[str]:
    """The headline numbers of a finished run, as ``mpq run`` prints them."""
    lines = [
        f"run directory: {run.root}",
        f"  final plans: {plan_file(run.final_weight)}, {plan_file(run.final_act)} (+ {s['act_protected']} "
        "act-protected layers)",
        f"  images:      {run.generated_images}  (FP references: {run.fp_images})",
        f"  checkpoint:  {run.ckpt}",
        f"  report:      {run.report_page}",
        f"  weights {bits_text(s['weight_avg_bits'], s['weight_fp_layers'])} avg bits, activations "
        f"{bits_text(s['act_avg_bits'], s['act_fp_layers'])} avg bits (averages over the quantized layers)",
        f"  weight bytes {s['weight_bytes']:,.0f} vs FP {s['fp_weight_bytes']:,.0f} "
        f"({s['weight_bytes'] / s['fp_weight_bytes']:.1%}; "
        f"FP at {s['fp_dtype_bytes']} bytes a weight)",
        f"  MSE vs FP images: {s['final_mse']:.6g}",
    ]
    ev = s.get("eval", {})
    if CHOSEN in ev and "W4A8" in ev and ev["W4A8"].get("mse"):
        c, u = ev[CHOSEN]["mse"], ev["W4A8"]["mse"]
        lines.append(
            f"  evaluation MSE vs FP ({s['eval_prompts']['n']} prompts): chosen {c:.3g}, uniform W4A8 {u:.3g} "
            f"({c / u:.2f}x)"
        )
    ref = s.get("weight_refine")
    if ref:
        lines.append(
            f"  weight plan refined (select.refine_evals): selection MSE {ref['ratio']:.2f}x the search's best within "
            f"the budget ({ref['start']}; {ref['moves']} moves, {ref['evals']} evaluations)"
            if ref["plan_file"]
            else f"  weight plan refinement: no better plan than the search's in {ref['evals']} evaluations"
        )
    act = [p for p in (s.get("budget_curves") or {}).get("act", []) if p["chosen"]]
    if act:
        lines.append(
            f"  activation budget: the chosen plan's selection MSE is {act[0]['vs_reference']:.2f}x the plan with the "
            f"most bytes (A8); what each budget costs: {run.curve('act')}"
        )
    chosen = s["eval"].get(CHOSEN, {})
    if "export" in s and "export_file_bytes" in chosen:
        fp16 = s["export"]["fp16_denoiser_bytes"]
        lines.append(
            f"  exported (`mpq export`, FP parts FP16): denoiser file {chosen['export_file_bytes']:,} bytes vs FP16 "
            f"{fp16:,} "
            f"({fp16 / chosen['export_file_bytes']:.2f}x smaller); its layer weights {chosen['export_weight_bytes']:,} "
            "bytes vs "
            f"{chosen['weight_bytes']:,.0f} computed ({export_gap(chosen, s['export'])})"
        )
    adh = adherence_line(s)
    if adh:
        lines.append(f"  prompt adherence ({s['eval_prompts']['n']} prompts, {s['eval_prompts']['source']}): {adh}")
    return lines


def export_gap(v: dict[str, Any], export: dict[str, Any]) -> str:
    """Why a plan's exported layer-weight bytes differ from the cost model's, term by term (packed codes are priced
    exactly as stored, so only scale and FP-weight widths remain)."""
    parts = []
    if v.get("export_scale_extra_bytes"):
        parts.append(
            f"{v['export_scale_extra_bytes']:+,} bytes: scales stored fp32, priced at {export['scale_bytes_counted']}"
        )
    if v.get("export_fp_weight_extra_bytes"):
        parts.append(
            f"{v['export_fp_weight_extra_bytes']:+,} bytes: FP weights stored fp16, priced at "
            f"{export['fp_bytes_counted']}"
        )
    return "; ".join(parts) or "no difference"


def adherence_line(summary: dict[str, Any], labels: tuple[str, ...] = ("FP", "W8A8", "W4A8", CHOSEN)) -> str | None:
    """'FP 95%, W8A8 93%, ...' of the labels evaluated with adherence, or None."""
    ev = summary.get("eval", {})
    parts = [f"{k} {ev[k]['adherence']['all']:.0%}" for k in labels if ev.get(k, {}).get("adherence")]
    return ", ".join(parts) if parts else None


# ------------------------------------------------------------------------------ html
def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _eval_rows(s: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    fp = s["fp_weight_bytes"]
    cols = [
        "images",
        "weight bytes",
        "exported weight bytes",
        "exported denoiser file",
        "avg W bits",
        "avg A bits",
        "MSE vs FP",
        "SSIM",
        "PSNR (dB)",
    ]
    has_adh = any(v.get("adherence") for v in s["eval"].values())
    if has_adh:
        cols += ["adherence (all)"] + list(ATTRIBUTES)
    rows = []
    for label, v in s["eval"].items():
        row = {
            "images": label,
            "weight bytes": f"{v['weight_bytes']:,.0f} ({v['weight_bytes'] / fp:.1%})",
            "exported weight bytes": f"{v['export_weight_bytes']:,}" if "export_weight_bytes" in v else "",
            "exported denoiser file": f"{v['export_file_bytes']:,}" if "export_file_bytes" in v else "",
            "avg W bits": bits_text(v["weight_avg_bits"], v["weight_fp_layers"]),
            "avg A bits": bits_text(v["act_avg_bits"], v["act_fp_layers"]),
            "MSE vs FP": f"{v['mse']:.4g}",
            "SSIM": f"{v['ssim']:.4f}",
            "PSNR (dB)": f"{v['psnr']:.2f}" if np.isfinite(v["psnr"]) else "inf",
        }
        if v.get("adherence"):
            row["adherence (all)"] = f"{v['adherence']['all']:.1%}"
            row.update({a: f"{v['adherence'][a]:.1%}" for a in ATTRIBUTES})
        rows.append(row)
    return rows, cols


def _image_grid(s: dict[str, Any], prompts: list[str]) -> str:
    n = min(SHOWN_IMAGES, len(prompts))
    rows = []
    for label, v in s["eval"].items():
        marks = (v.get("adherence") or {}).get("per_image")
        cells = []
        for i in range(n):
            verdict = "" if marks is None else (" ✓" if marks[i] else " ✗")
            cells.append(
                "<td><figure><img "
                f"src='images/{slug(label)}/{i:04d}.png'><figcaption>{html.escape(prompts[i])}{verdict}</figcaption></figure></td>"
            )
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table class=imgs>{''.join(rows)}</table>"


def _formats_line(s: dict[str, Any]) -> str:
    """The chosen plan's weight candidates (layers, share of weights), for a run with weight formats."""
    shares = s.get("weight_formats")
    if not shares:
        return ""
    text = ", ".join(f"{k}: {int(v['layers'])} layers ({v['weight_share']:.0%} of weights)" for k, v in shares.items())
    return f"<p>Chosen weight candidates: {html.escape(text)}.</p>"


def _curves_html(s: dict[str, Any]) -> str:
    """What each budget costs, per kind: the best selection plan at no more bytes, against the plan with the most."""
    out = []
    for kind, points in (s.get("budget_curves") or {}).items():
        if not points:
            continue
        rows = [
            {
                "avg bits": f"{p['avg_bits']:.3f}",
                "bytes": f"{p['bytes']:,.0f}",
                "plan": p["plan_file"],
                "MSE vs FP": f"{p['mse']:.4g}",
                "x most bytes": f"{p['vs_reference']:.2f}",
                "chosen": "yes" if p["chosen"] else "",
            }
            for p in points
        ]
        ref = " (uniform A8 on the chosen weights)" if kind == "act" else ""
        out.append(
            f"<h3>What each {kind} budget costs</h3><p>The best {kind} plan selection scored at no more bytes, where "
            f"it improves on every smaller budget (selection images), and its MSE as a ratio to the plan with the most "
            f"bytes{ref}. A budget <code>auto</code> takes the fewest bytes no worse than that plan.</p>"
            + _table(rows, ["avg bits", "bytes", "plan", "MSE vs FP", "x most bytes", "chosen"])
        )
    return "".join(out)


def _refine_html(s: dict[str, Any]) -> str:
    """Selection's refinement of the chosen weight plan, in one paragraph."""
    ref = s.get("weight_refine")
    if not ref:
        return ""
    what = (
        f"{ref['moves']} moves lowered the selection MSE from {ref['start_mse']:.4g} to {ref['mse']:.4g} "
        f"({ref['ratio']:.2f}x); the refined plan <code>{ref['plan_file']}</code> is the chosen weight plan"
        if ref["plan_file"]
        else "no move improved on it; the search's plan is kept"
    )
    return (
        f"<h3>Refinement of the weight plan</h3><p>From the search's best plan within the budget "
        f"(<code>{ref['start']}</code>), a local search scored each one-step move by the selection images "
        f"({ref['evals']} evaluations, <code>select.refine_evals</code>): {what}.</p>"
    )


def _html(cfg: DictConfig, run: RunDir, prompts: list[str], s: dict[str, Any], weight_rows: list[Score]) -> str:
    chosen = s["chosen"]
    fp, fpb = s["fp_weight_bytes"], 8 * s["fp_dtype_bytes"]
    sel = [
        {
            "plan_file": r.plan_file,
            "mse": f"{r.mse:.6g}",
            "ssim": f"{r.ssim:.5f}",
            "psnr": f"{r.psnr:.2f}",
            "adherence": "" if math.isnan(r.adherence) else f"{r.adherence:.3f}",
            "avg_bits": f"{r.avg_bits:.3f}",
            "bytes": f"{r.bytes:,.0f}",
            "chosen": "yes" if r.chosen else "",
        }
        for r in weight_rows
    ]
    plan_rows = [
        {
            "plan": f"weight: {chosen['weight']}",
            "avg bits": bits_text(s["weight_avg_bits"], s["weight_fp_layers"]),
            "content": f"{s['content_weight_avg_bits']:.3f}",
            "quality": f"{s['quality_weight_avg_bits']:.3f}",
            "bytes": f"{s['weight_bytes']:,.0f} ({s['weight_bytes'] / fp:.1%} of FP{fpb})",
        },
        {
            "plan": f"act: {chosen['act']} ({s['act_protected']} act-protected)",
            "avg bits": bits_text(s["act_avg_bits"], s["act_fp_layers"]),
            "content": f"{s['content_act_avg_bits']:.3f}",
            "quality": f"{s['quality_act_avg_bits']:.3f}",
            "bytes": f"{s['act_bytes']:,.0f} per sample",
        },
    ]
    eval_rows, eval_cols = _eval_rows(s)
    adh = adherence_line(s)
    sens = "".join(
        f"<figure class=plot><img src='{run.sensitivity_plot(k, m).name}'><figcaption>{k} {m}</figcaption></figure>"
        for k in KINDS
        for m in METRICS
        if run.sensitivity_plot(k, m).is_file()
    )
    spread = "".join(
        f"<li>{k}: " + ", ".join(f"{b} bit {v[0]:.4f} / {v[1]:.4f} / {v[2]:.4f}" for b, v in bits.items()) + "</li>"
        for k, bits in s["ssim_sensitivity_spread"].items()
    )
    side = min(256, cfg.sampling.resolution * 2)
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>mpq report: {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1500px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} th{{background:#f3f3f3}}
img{{max-width:100%}} .imgs img{{width:{side // 2 + 32}px;image-rendering:pixelated}} .imgs
figure{{margin:0;width:{side // 2 + 32}px}}
figcaption{{font-size:11px;color:#333}} figure.plot{{display:inline-block;margin:0 12px 12px 0;width:45%}}
.headline{{font-size:1.1em;background:#eef6ff;padding:10px}}</style></head><body>
<h1>mpq report: {html.escape(cfg.name)}</h1>
<p class=headline>Model <code>{html.escape(cfg.model.id)}</code>. Chosen plan: weights
{bits_text(s["weight_avg_bits"], s["weight_fp_layers"])}
avg bits, activations {bits_text(s["act_avg_bits"], s["act_fp_layers"])} avg bits; weight bytes
{s["weight_bytes"]:,.0f} vs FP{fpb} {fp:,.0f}
({s["weight_bytes"] / fp:.1%}); final images MSE vs FP {s["final_mse"]:.6g}.
{f"Prompt adherence on the evaluation prompts: {html.escape(adh)}." if adh else ""}</p>
<h2>Chosen plans</h2>{_table(plan_rows, ["plan", "avg bits", "content", "quality", "bytes"])}
{_formats_line(s)}
<h2>Evaluation: {s["eval_prompts"]["n"]} prompts ({html.escape(str(s["eval_prompts"]["source"]))}), scored against
FP</h2>
<p>"{MIXED_W}": the selection's best weight plan ({html.escape(str(s["mixed_weight_plan"]))}) with no more weight
bytes than uniform W4,
activations FP: compare it with W4A16. Average bits are over the quantized layers; layers kept FP are counted apart
("+ N FP layers") and priced in the bytes (FP{fpb}). "weight bytes" is the cost model's arithmetic;
"exported" columns are the real <code>mpq export</code> (packed integers, fp32 scales, FP parts FP16): the layers'
weights, and the whole
denoiser file (norms, biases, BOS caches, activation params included; FP16 denoiser:
{s.get("export", {}).get("fp16_denoiser_bytes", 0):,} bytes).</p>
{_table(eval_rows, eval_cols)}
<h2>Images (prompts under the
images{"; ✓ / ✗: every attribute read back right or not" if adh else ""})</h2>{_image_grid(s, prompts)}
<h2>Candidates: the program's Pareto front</h2><p>The integer program's objective against bytes; the line is the
front (no other candidate has fewer bytes and a higher objective).</p><img src='{run.pareto_plot.name}'>
<h2>Candidates as selection scored them</h2><p>Every candidate's selection-image MSE against FP (log scale) against
its bytes;
uniform plans on the same images for reference (weights: W8/W4/W2 with FP activations; activations: A8/A4 on the chosen
weight plan); the chosen plans starred.</p><img src='{run.selection_plot.name}'>
{_curves_html(s)}{_refine_html(s)}
{_peers_html(s.get("peers"))}
{trace_html(run)}
<h2>Weight candidates scored (selection
images)</h2>{_table(sel, ["plan_file", "mse", "ssim", "psnr", "adherence", "avg_bits", "bytes", "chosen"])}
<h2>Sensitivity per layer</h2><p>Content-layer SSIM sensitivity, min / median / max:</p><ul>{spread}</ul>{sens}
</body></html>
"""


def trace_html(run: RunDir) -> str:
    """The run's precision trace (``mpq trace``'s default ``RUN/trace``), when one exists: its plots copied into the
    report folder and the worst components of each mode."""
    from mpq.trace.files import PLOTS, TRACE_JSON, read_trace

    folder = run.trace
    if not (folder / TRACE_JSON).is_file():
        return ""
    t = read_trace(folder / TRACE_JSON)
    figures = ""
    for name in PLOTS:
        if (folder / name).is_file():
            data = (folder / name).read_bytes()
            write_with(run.report_copy(folder / name), lambda tmp, d=data: tmp.write_bytes(d))
            figures += f"<img src='{name}'>"
    rows = []
    for mode in t["modes"]:
        worst = sorted((r for r in t["components"][mode] if r["mae"] > 0), key=lambda r: r["sqnr_db"])[:6]
        rows += [
            {
                "mode": mode.replace("_", " "),
                "call": r["id"],
                "SQNR dB": f"{r['sqnr_db']:.2f}",
                "cosine": f"{r['cos']:.6f}",
                "MAE": f"{r['mae']:.3g}",
                "max abs": f"{r['max_abs']:.3g}",
            }
            for r in worst
        ]
    image = f" Image MSE vs FP {t['image']['mse']:.6g}." if "image" in t else ""
    return f"""<h2>Precision trace</h2><p>{html.escape(str(t["quantized"]["label"]))} against FP on
"{html.escape(t["prompt"])}" (seed {t["seed"]}), from <code>{html.escape(str(folder))}</code>.{image} End to end: the
quantized pipeline on its own outputs; isolated: each component, step and layer fed the FP inputs. Worst component
calls first:</p>{_table(rows, ["mode", "call", "SQNR dB", "cosine", "MAE", "max abs"])}{figures}"""


def _peers_html(peers: dict[str, Any] | None) -> str:
    if not peers:
        return ""
    rows = [
        {
            "bits / weight": f"{r['level']:g}",
            "bytes": f"{r['bytes']:,.0f}",
            "mpq plan": html.escape(str(r["mpq"])),
            "peer's best": html.escape(str(r["sdnq"])),
            "MSE mpq / peer (95% CI)": f"{r['ratio'][0]:.2f} ({r['ratio'][1]:.2f}-{r['ratio'][2]:.2f})",
        }
        for r in peers.get("levels", [])
    ]
    cols = ["bits / weight", "bytes", "mpq plan", "peer's best", "MSE mpq / peer (95% CI)"]
    return f"""<h2>Against a peer at equal bytes</h2><p>From <code>{html.escape(peers["source"])}</code>
({peers.get("n_images")} held-out images; weight-only; both tools' bytes counted the same way): mpq's plan chosen by
selection against the peer's best configuration at no more bytes.</p><img src='peers.png'>{_table(rows, cols)}"""
