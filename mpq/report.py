"""The run report: a static ``report/index.html`` (no server) and ``report/summary.json``.

The evidence is measured on the evaluation prompts (:mod:`mpq.evaluate`):
FP, uniform W8A8 / W4A8 / W4A16 / W2A16 (where calibrated), the best mixed
weight plan with no more weight bytes than uniform W4 (activations FP), and the
chosen W/A plan: weight bytes, MSE / SSIM / PSNR vs FP and, for the embedded
shapes model, prompt adherence. The mixed plan is picked on the selection
images, so on held-out evaluation prompts its score is not fitted to them.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from mpq.evaluate import eval_set, evaluate_plans, slug
from mpq.generate import to_array
from mpq.groups import CONTENT, QUALITY
from mpq.infer import quantized_pipeline
from mpq.io import read_csv, write_json, write_text
from mpq.layer_table import layer_table
from mpq.metrics import image_mse
from mpq.plan import BitPlan, read_layer_list, read_plan, weight_bytes
from mpq.quant.model import LayerInfo
from mpq.rundir import RunDir
from mpq.search_run import plot_pareto
from mpq.sensitivity import result_path
from mpq.shapes.data import ATTRIBUTES

MIXED_W = "mixed W, A16"  # the best mixed weight plan with no more bytes than uniform W4, activations FP
CHOSEN = "chosen"
SHOWN_IMAGES = 8


def final_plan(run: RunDir, protect_weights: bool = False) -> tuple[BitPlan, list[str]]:
    """The selected plan (act-protected layers FP; their weights too with ``protect_weights``) and the act-protect list."""
    sel = run.root / "selection"
    protect = read_layer_list(sel / "final_act_protect.pt") if (sel / "final_act_protect.pt").is_file() else []
    return BitPlan(read_plan(sel / "final_weight.yaml"), read_plan(sel / "final_act.yaml")).protect(protect, protect_weights), protect


def plan_bits_bytes(plan: BitPlan, infos: list[LayerInfo], s: Any) -> dict[str, float]:
    """Size-weighted average W and A bits (FP counts 16), per group, and weight bytes."""

    def avg(bits: dict[str, int], attr: str, group: str | None = None) -> float:
        chosen = [i for i in infos if group is None or i.group == group]
        total = sum(getattr(i, attr) for i in chosen)
        return sum(float(bits.get(i.name, 16)) * getattr(i, attr) for i in chosen) / total

    out = {"weight_avg_bits": avg(plan.weight, "weight_numel"), "act_avg_bits": avg(plan.act, "act_numel"),
           "weight_bytes": sum(weight_bytes(i.weight_numel, i.out_channels * i.n_parts, plan.weight.get(i.name), s.scale_bytes, s.fp_bytes) for i in infos)}
    for g in (CONTENT, QUALITY):
        out[f"{g}_weight_avg_bits"] = avg(plan.weight, "weight_numel", g)
        out[f"{g}_act_avg_bits"] = avg(plan.act, "act_numel", g)
    return out


def final_mse(run: RunDir, n: int) -> float:
    gen = sorted((run.root / "generated_images").glob("*.png"))[:n]
    refs = [run.fp_images / p.name for p in gen]
    return float(np.mean(image_mse(to_array([Image.open(p) for p in gen]), to_array([Image.open(p) for p in refs]))))


def ssim_spread(run: RunDir, bits: list[int]) -> dict[str, dict[str, list[float]]]:
    """Per kind and candidate bit: min, median, max of the content layers' SSIM sensitivity."""
    from mpq.io import read_yaml

    out: dict[str, dict[str, list[float]]] = {}
    for kind in ("weight", "act"):
        path = result_path(run, kind, "ssim")
        if path.is_file():
            table = np.array(list(read_yaml(path).values()), dtype=np.float64)
            out[kind] = {str(b): [float(table[:, k].min()), float(np.median(table[:, k])), float(table[:, k].max())] for k, b in enumerate(bits)}
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    return read_csv(path) if path.is_file() else []


def build_report(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> Path:
    """Evaluate FP, uniform and chosen plans on the evaluation prompts; write summary.json, index.html, the Pareto plot."""
    rep = run.root / "report"
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    bits = list(manifest["bits"])
    infos = layer_table(cfg)
    final, protect = final_plan(run, cfg.search.protect_weights)
    plans: dict[str, BitPlan] = {}
    for label, wb, ab in (("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A16", 4, None), ("W2A16", 2, None)):
        if wb in bits and (ab is None or ab in bits):
            plans[label] = BitPlan.uniform(qm.names, wb, ab)
    w4_bytes = plan_bits_bytes(BitPlan.uniform(qm.names, 4, None), infos, cfg.search)["weight_bytes"] if 4 in bits else None
    weight_rows = _csv(run.root / "selection" / "weight_scores.csv")
    fits = [r for r in weight_rows if w4_bytes is not None and float(r["bytes"]) <= w4_bytes * (1 + 1e-9)]
    mixed_file = min(fits, key=lambda r: (float(r["mse"]), float(r["bytes"]), r["plan_file"]))["plan_file"] if fits else None
    if mixed_file:
        plans[MIXED_W] = BitPlan(read_plan(run.root / "candidates" / "weight" / mixed_file))
    plans[CHOSEN] = final
    data = eval_set(cfg, run, pipe, rep / "images" / "fp")
    results = evaluate_plans(cfg, pipe, qm, plans, data, rep / "images")
    for label, res in results.items():
        res.update(plan_bits_bytes(plans.get(label, BitPlan()), infos, cfg.search))
    summary: dict[str, Any] = plan_bits_bytes(final, infos, cfg.search)
    summary.update({
        "fp16_bytes": sum(weight_bytes(i.weight_numel, i.out_channels, None, cfg.search.scale_bytes, 2) for i in infos),
        "act_protected": len(protect),
        "final_mse": final_mse(run, cfg.infer.num_images),
        "eval_prompts": {"source": cfg.eval.prompts_file or "calibration prompts", "n": len(data.prompts)},
        "eval": results,
        "mixed_weight_plan": mixed_file,
        "ssim_sensitivity_spread": ssim_spread(run, bits),
    })
    chosen = {k: next((r["plan_file"] for r in _csv(run.root / "selection" / f"{k}_scores.csv") if r["chosen"] == "True"), "") for k in ("weight", "act")}
    pareto_rows = _csv(run.root / "candidates" / "pareto.csv")
    for r in pareto_rows:
        for k in ("bytes", "K", "content_norm_objective", "quality_norm_objective"):
            r[k] = float(r[k]) if r.get(k) not in (None, "", "nan") else float("nan")
        r["pareto"] = r["pareto"] == "True"
    plot_pareto(pareto_rows, rep / "pareto.png", chosen)
    write_json(rep / "summary.json", summary)
    write_text(rep / "index.html", _html(cfg, run, data.prompts, summary, chosen, weight_rows))
    return rep / "index.html"


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
    cols = ["images", "weight bytes", "avg W bits", "avg A bits", "MSE vs FP", "SSIM", "PSNR (dB)"]
    has_adh = any(v.get("adherence") for v in s["eval"].values())
    if has_adh:
        cols += ["adherence (all)"] + list(ATTRIBUTES)
    rows = []
    for label, v in s["eval"].items():
        row = {"images": label, "weight bytes": f"{v['weight_bytes']:,.0f} ({v['weight_bytes'] / s['fp16_bytes']:.1%})",
               "avg W bits": f"{v['weight_avg_bits']:.2f}", "avg A bits": f"{v['act_avg_bits']:.2f}",
               "MSE vs FP": f"{v['mse']:.4g}", "SSIM": f"{v['ssim']:.4f}", "PSNR (dB)": f"{v['psnr']:.2f}" if np.isfinite(v["psnr"]) else "inf"}
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
            cells.append(f"<td><figure><img src='images/{slug(label)}/{i:04d}.png'><figcaption>{html.escape(prompts[i])}{verdict}</figcaption></figure></td>")
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table class=imgs>{''.join(rows)}</table>"


def _html(cfg: DictConfig, run: RunDir, prompts: list[str], s: dict[str, Any], chosen: dict[str, str], sel: list[dict[str, str]]) -> str:
    plan_rows = [
        {"plan": f"weight: {chosen['weight']}", "avg bits": f"{s['weight_avg_bits']:.3f}", "content": f"{s['content_weight_avg_bits']:.3f}",
         "quality": f"{s['quality_weight_avg_bits']:.3f}", "bytes": f"{s['weight_bytes']:,.0f} ({s['weight_bytes'] / s['fp16_bytes']:.1%} of FP16)"},
        {"plan": f"act: {chosen['act']} (+{s['act_protected']} FP)", "avg bits": f"{s['act_avg_bits']:.3f}", "content": f"{s['content_act_avg_bits']:.3f}",
         "quality": f"{s['quality_act_avg_bits']:.3f}", "bytes": ""},
    ]
    eval_rows, eval_cols = _eval_rows(s)
    adh = adherence_line(s)
    sens = "".join(f"<figure class=plot><img src='sensitivity_{k}_{m}.png'><figcaption>{k} {m}</figcaption></figure>"
                   for k in ("weight", "act") for m in ("sqnr", "ssim") if (run.root / "report" / f"sensitivity_{k}_{m}.png").is_file())
    spread = "".join(f"<li>{k}: " + ", ".join(f"{b} bit {v[0]:.4f} / {v[1]:.4f} / {v[2]:.4f}" for b, v in bits.items()) + "</li>"
                     for k, bits in s["ssim_sensitivity_spread"].items())
    side = min(256, cfg.sampling.resolution * 2)
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>mpq report: {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1500px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} th{{background:#f3f3f3}}
img{{max-width:100%}} .imgs img{{width:{side // 2 + 32}px;image-rendering:pixelated}} .imgs figure{{margin:0;width:{side // 2 + 32}px}}
figcaption{{font-size:11px;color:#333}} figure.plot{{display:inline-block;margin:0 12px 12px 0;width:45%}}
.headline{{font-size:1.1em;background:#eef6ff;padding:10px}}</style></head><body>
<h1>mpq report: {html.escape(cfg.name)}</h1>
<p class=headline>Model <code>{html.escape(cfg.model.id)}</code>. Chosen plan: weights {s['weight_avg_bits']:.2f} avg bits,
activations {s['act_avg_bits']:.2f} avg bits; weight bytes {s['weight_bytes']:,.0f} vs FP16 {s['fp16_bytes']:,.0f}
({s['weight_bytes'] / s['fp16_bytes']:.1%}); final images MSE vs FP {s['final_mse']:.6g}.
{f"Prompt adherence on the evaluation prompts: {html.escape(adh)}." if adh else ""}</p>
<h2>Chosen plans</h2>{_table(plan_rows, ["plan", "avg bits", "content", "quality", "bytes"])}
<h2>Evaluation: {s['eval_prompts']['n']} prompts ({html.escape(str(s['eval_prompts']['source']))}), scored against FP</h2>
<p>"{MIXED_W}": the selection's best weight plan ({html.escape(str(s['mixed_weight_plan']))}) with no more weight bytes than uniform W4,
activations FP: compare it with W4A16. Averages count FP layers as 16 bits.</p>
{_table(eval_rows, eval_cols)}
<h2>Images (prompts under the images{"; ✓ / ✗: every attribute read back right or not" if adh else ""})</h2>{_image_grid(s, prompts)}
<h2>Candidates: Pareto front</h2><img src='pareto.png'>
<h2>Weight candidates scored (selection images)</h2>{_table(sel, ["plan_file", "mse", "ssim", "psnr", "adherence", "avg_bits", "bytes", "chosen"])}
<h2>Sensitivity per layer</h2><p>Content-layer SSIM sensitivity, min / median / max:</p><ul>{spread}</ul>{sens}
</body></html>
"""
