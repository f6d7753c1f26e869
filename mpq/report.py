"""The run report: a static ``report/index.html`` (no server) and the run's headline numbers."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from mpq.calib import calib_prompts
from mpq.generate import generate, save_images, to_array
from mpq.groups import CONTENT, QUALITY
from mpq.infer import quantized_pipeline
from mpq.io import read_csv, write_json, write_text
from mpq.layer_table import layer_table
from mpq.metrics import image_mse
from mpq.plan import read_layer_list, read_plan, weight_bytes
from mpq.quant.model import LayerInfo
from mpq.rundir import RunDir
from mpq.search_run import plot_pareto
from mpq.select import image_scores


def plan_summary(cfg: DictConfig, run: RunDir, infos: list[LayerInfo]) -> dict[str, Any]:
    """Average W/A bits (size-weighted; FP activations count 16), per group, and weight bytes vs FP16."""
    w = read_plan(run.root / "selection" / "final_weight.yaml")
    a = read_plan(run.root / "selection" / "final_act.yaml")
    protect = set(read_layer_list(run.root / "selection" / "final_act_protect.pt"))
    s = cfg.search

    def avg(values: dict[str, float], sizes: dict[str, int], names: list[str]) -> float:
        return sum(values[n] * sizes[n] for n in names) / sum(sizes[n] for n in names)

    wbits = {i.name: float(w.get(i.name, 16)) for i in infos}
    abits = {i.name: float(16 if i.name in protect else a.get(i.name, 16)) for i in infos}
    wsize = {i.name: i.weight_numel for i in infos}
    asize = {i.name: i.act_numel for i in infos}
    out: dict[str, Any] = {
        "weight_avg_bits": avg(wbits, wsize, list(wsize)),
        "act_avg_bits": avg(abits, asize, list(asize)),
        "weight_bytes": sum(weight_bytes(i.weight_numel, i.out_channels, w.get(i.name), s.scale_bytes, s.fp_bytes) for i in infos),
        "fp16_bytes": sum(i.weight_numel * 2 for i in infos),
        "act_protected": len(protect),
    }
    for g in (CONTENT, QUALITY):
        names = [i.name for i in infos if i.group == g]
        out[f"{g}_weight_avg_bits"] = avg(wbits, wsize, names)
        out[f"{g}_act_avg_bits"] = avg(abits, asize, names)
    return out


def final_mse(run: RunDir, n: int) -> float:
    gen = sorted((run.root / "generated_images").glob("*.png"))[:n]
    refs = [run.fp_images / p.name for p in gen]
    return float(np.mean(image_mse(to_array([Image.open(p) for p in gen]), to_array([Image.open(p) for p in refs]))))


def _csv(path: Path) -> list[dict[str, str]]:
    return read_csv(path) if path.is_file() else []


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> Path:
    """Uniform W8A8 / W4A8 images, the evidence table, the Pareto plot with the chosen plans, index.html."""
    rep = run.root / "report"
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe)
    prompts, seeds = calib_prompts(run)
    n = min(cfg.select.num_images, len(prompts))
    refs = to_array([Image.open(run.fp_images / f"{i:04d}.png") for i in range(n)])
    sel = _csv(run.root / "selection" / "weight_scores.csv")
    chosen = {k: next((r["plan_file"] for r in _csv(run.root / "selection" / f"{k}_scores.csv") if r["chosen"] == "True"), "") for k in ("weight", "act")}
    uniform: dict[str, dict[str, float]] = {}
    try:
        for label, wb, ab in (("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A16", 4, None), ("W8A16", 8, None)):
            if wb not in manifest["bits"] or (ab is not None and ab not in manifest["bits"]):
                continue
            qm.set_uniform(wb, ab)
            images = generate(pipe, prompts[:n], seeds[:n], cfg)
            if label in ("W8A8", "W4A8"):
                save_images(images, rep / "images" / label.lower())
            uniform[label] = image_scores(images, refs)
    finally:
        qm.set_fp()
    infos = layer_table(cfg)
    summary = plan_summary(cfg, run, infos)
    summary["final_mse"] = final_mse(run, n)
    for label, bits in (("W4A16", 4), ("W8A16", 8)):
        if label in uniform:
            uniform[label]["bytes"] = sum(weight_bytes(i.weight_numel, i.out_channels, bits, cfg.search.scale_bytes) for i in infos)
    pareto_rows = _csv(run.root / "candidates" / "pareto.csv")
    for r in pareto_rows:
        for k in ("bytes", "K", "content_norm_objective", "quality_norm_objective"):
            r[k] = float(r[k]) if r.get(k) not in (None, "", "nan") else float("nan")
        r["pareto"] = r["pareto"] == "True"
    plot_pareto(pareto_rows, rep / "pareto.png", chosen)
    # evidence: mixed weight plans vs uniform W4 at no more weight bytes (activations FP in both)
    evidence = []
    if "W4A16" in uniform:
        u4 = uniform["W4A16"]
        evidence.append({"plan": "uniform W4 (A FP)", "weight bytes": f"{u4['bytes']:,.0f}", "MSE vs FP": f"{u4['mse']:.6g}"})
        fits = [r for r in sel if float(r["bytes"]) <= u4["bytes"] * 1.0001]
        if fits:
            best = min(fits, key=lambda r: float(r["mse"]))
            evidence.append({"plan": f"best mixed plan with <= bytes ({best['plan_file']}, A FP)", "weight bytes": f"{float(best['bytes']):,.0f}",
                             "MSE vs FP": f"{float(best['mse']):.6g}"})
    summary["evidence"] = evidence
    summary["uniform"] = uniform
    write_json(rep / "summary.json", summary)
    write_text(rep / "index.html", _html(cfg, run, n, prompts, summary, chosen, sel))
    return rep / "index.html"


def _html(cfg: DictConfig, run: RunDir, n: int, prompts: list[str], s: dict[str, Any], chosen: dict[str, str], sel: list[dict[str, str]]) -> str:
    chosen_dir = f"../selection/images/act/{Path(chosen['act']).stem}"
    rows = []
    for i in range(n):
        cells = [f"../fp_images/{i:04d}.png", f"images/w8a8/{i:04d}.png", f"images/w4a8/{i:04d}.png", f"{chosen_dir}/{i:04d}.png"]
        rows.append("<tr><td class=p>" + html.escape(prompts[i]) + "</td>" + "".join(f"<td><img src='{c}'></td>" for c in cells) + "</tr>")
    act_scores = _csv(run.root / "selection" / "act_scores.csv")
    plan_rows = [
        {"plan": f"weight: {chosen['weight']}", "avg bits": f"{s['weight_avg_bits']:.3f}", "content": f"{s['content_weight_avg_bits']:.3f}",
         "quality": f"{s['quality_weight_avg_bits']:.3f}", "bytes": f"{s['weight_bytes']:,.0f} ({s['weight_bytes'] / s['fp16_bytes']:.1%} of FP16)"},
        {"plan": f"act: {chosen['act']} (+{s['act_protected']} FP)", "avg bits": f"{s['act_avg_bits']:.3f}", "content": f"{s['content_act_avg_bits']:.3f}",
         "quality": f"{s['quality_act_avg_bits']:.3f}", "bytes": ""},
    ]
    metric_rows = [{"images": k, "MSE": f"{v['mse']:.6g}", "SSIM": f"{v['ssim']:.6f}", "PSNR (dB)": f"{v['psnr']:.2f}"} for k, v in s["uniform"].items()]
    best_act = next((r for r in act_scores if r["chosen"] == "True"), None)
    if best_act:
        metric_rows.append({"images": "chosen mixed plan", "MSE": f"{float(best_act['mse']):.6g}", "SSIM": f"{float(best_act['ssim']):.6f}",
                            "PSNR (dB)": f"{float(best_act['psnr']):.2f}"})
    sens = "".join(f"<figure><img src='sensitivity_{k}_{m}.png'><figcaption>{k} {m}</figcaption></figure>"
                   for k in ("weight", "act") for m in ("sqnr", "ssim") if (run.root / "report" / f"sensitivity_{k}_{m}.png").is_file())
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>mpq report: {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}} th{{background:#f3f3f3}}
img{{max-width:100%}} .imgs img{{width:{min(256, cfg.sampling.resolution * 2)}px;image-rendering:pixelated}} td.p{{max-width:260px}}
figure{{display:inline-block;margin:0 12px 12px 0;width:45%}} .headline{{font-size:1.1em;background:#eef6ff;padding:10px}}</style></head><body>
<h1>mpq report: {html.escape(cfg.name)}</h1>
<p class=headline>Model <code>{html.escape(cfg.model.id)}</code>. Chosen plan: weights {s['weight_avg_bits']:.2f} avg bits,
activations {s['act_avg_bits']:.2f} avg bits; weight bytes {s['weight_bytes']:,.0f} vs FP16 {s['fp16_bytes']:,.0f}
({s['weight_bytes'] / s['fp16_bytes']:.1%}); final images MSE vs FP {s['final_mse']:.6g}.</p>
<h2>Chosen plans</h2>{_table(plan_rows, ["plan", "avg bits", "content", "quality", "bytes"])}
<h2>Images vs FP (selection prompts)</h2>{_table(metric_rows, ["images", "MSE", "SSIM", "PSNR (dB)"])}
<h2>Is the search worth it? Mixed vs uniform at the same weight bytes</h2>
{_table(s['evidence'], ["plan", "weight bytes", "MSE vs FP"]) if s['evidence'] else "<p>no uniform W4 reference (4 bits not a candidate)</p>"}
<h2>FP vs uniform W8A8 vs uniform W4A8 vs chosen mixed plan</h2>
<table class=imgs><tr><th>prompt</th><th>FP</th><th>W8A8</th><th>W4A8</th><th>mixed (chosen)</th></tr>{''.join(rows)}</table>
<h2>Candidates: Pareto front</h2><img src='pareto.png'>
<h2>Weight candidates scored</h2>{_table(sel, ["plan_file", "mse", "ssim", "psnr", "avg_bits", "bytes", "chosen"])}
<h2>Sensitivity per layer</h2>{sens}
</body></html>
"""
