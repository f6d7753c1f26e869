"""Weight formats at equal bytes: integer bits only against integer bits + NormalFloat codebooks (weights only).

    python benchmarks/bench_formats.py --config tiny-sdxl          # 24 held-out prompts
    python benchmarks/bench_formats.py --config tiny-sd3 --n 24
    python benchmarks/bench_formats.py --sdxl-bytes-only            # the full-size SDXL UNet table alone

What runs, on the same pipeline, activations FP:

* one ``mpq run`` whose PTQ calibrates the integer bits 2/4/8 *and* ``nf7 nf12 nf16 nf24 nf32`` in one pass,
  whose sensitivity scores every candidate of every layer, whose search may give a content layer any of them and
  a quality layer those of 4 bits and more (4, 8, nf16, nf24, nf32: the integer search's rule, no W2 on quality
  layers) (**int + NF search**); the same run searched again with the integer bits only (**int-only search**: its
  sensitivity files hold exactly an integer-only run's numbers). Budgets are the bytes of uniform nf12, nf16 and
  nf24 (about 3.58, 4.0 and 4.58 average bits plus the NF scales); at each, the plan selection ranks best (its
  calibration-prompt MSE) at no more bytes -- chosen without seeing the evaluation images;
* uniform int4 (the run's integer quantizer) and uniform nf12 / nf16 / nf24 from the same checkpoint;
* SDNQ (data-free peer) static integer and its float-codebook types (fp4 = e2m1, fp3, fp5) row-wise and with its
  default groups, and its dynamic mode; at each budget SDNQ's best configuration at no more bytes *chosen by its
  evaluation MSE* (an oracle choice: favours the peer).

Bytes: :class:`mpq.cost.CostModel` (packed codes + every scale and offset at 2 bytes; NF's uint8 block ratios and
fp32 super-block maxima at their own widths), the same count for SDNQ (bench_peers). MSE per image against the FP
images of the held-out prompts; ratios to the int-only search with a paired-bootstrap 95% interval; adherence: the
shapes judge's fraction of images with every attribute right. Writes ``formats.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from _imagebench import ImageBench  # noqa: E402
from bench_peers import sdnq_bytes, sdnq_quantize  # noqa: E402

from mpq.calibration.checkpoint import load_checkpoint  # noqa: E402
from mpq.commands.main import main as mpq_main  # noqa: E402
from mpq.cost import CostModel  # noqa: E402
from mpq.metrics import paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan, read_plan  # noqa: E402
from mpq.quant.formats import parse_format  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402
from mpq.runner.files import read_records  # noqa: E402
from mpq.runner.rundir import RunDir  # noqa: E402
from mpq.selection import BudgetBest  # noqa: E402
from mpq.shapes.judge import adherence  # noqa: E402

FORMATS = ["nf7", "nf12", "nf16", "nf24", "nf32"]
LEVELS = ["nf12", "nf16", "nf24"]  # budgets: these formats' uniform bytes


def sdnq_configs() -> list[dict[str, Any]]:
    out = []
    for dtype in ("int3", "uint3", "int4", "uint4", "int5", "float4_e2m1fn", "float3_e1m1fn", "float5_e2m2fn"):
        for group in (-1, 0):
            gname = "row-wise" if group < 0 else "default groups"
            out.append({"label": f"SDNQ {dtype}, {gname}", "weights_dtype": dtype, "group_size": group})
    for t in (0.04, 0.025, 0.01, 0.005):
        out.append(
            {
                "label": f"SDNQ dynamic {t:g}, row-wise",
                "weights_dtype": "int2",
                "group_size": -1,
                "use_dynamic_quantization": True,
                "dynamic_loss_threshold": t,
            }
        )
    return out


def stage(name: str, root: Path, config: str, extra: list[str]) -> None:
    assert mpq_main([name, "--config", config, "--outdir", str(root), *extra]) == 0, name


def budget_plans(run: RunDir) -> dict[float, BitPlan]:
    """{budget bytes: the plan selection ranks best at no more bytes}."""
    rows = read_records(run.selection / "weight_budgets.csv", BudgetBest, "re-run the benchmark")
    return {r.budget_bytes: BitPlan(read_plan(run.scored_plan("weight", r.plan_file))) for r in rows if r.plan_file}


def score(bench: ImageBench, images: np.ndarray) -> dict[str, Any]:
    mse = ((images - bench.refs) ** 2).reshape(len(images), -1).mean(axis=1)
    adh = adherence(images, bench.prompts)
    return {"mse": mse, "adherence": None if adh is None else adh["all"]}


def evaluate(bench: ImageBench, plan: BitPlan) -> dict[str, Any]:
    bench.qm.apply(plan)
    try:
        return score(bench, bench.images())
    finally:
        bench.qm.set_fp()


def sdxl_bytes() -> list[dict[str, Any]]:
    """Exported denoiser bytes per uniform format on the full-size SDXL UNet (architecture only, meta device): the
    packed layers as the export writes them (fp32 scales; the tests check export bytes equal these), every other
    tensor in fp16."""
    from mpq.layers import meta_layers
    from mpq.models.loader import load_arch, meta_denoiser
    from mpq.runner.config import load_config

    cfg = load_config("sdxl-turbo-random", ["sampling.resolution=512"])
    infos = meta_layers(cfg)
    names = [i.name for i in infos]
    unet = meta_denoiser(load_arch(cfg))
    total = sum(p.numel() for p in unet.parameters())
    weights = sum(i.weight_numel for i in infos)
    rest = (total - weights) * 2  # biases, norms, embeddings at fp16
    wq = WeightQuant.from_config(cfg.quant.weight)
    cost = CostModel(4, 2, wq)
    rows = [{"format": "fp16", "bytes": rest + weights * 2}]
    for key in [2, 4, 8, *FORMATS, "fp8", "int4-sym-channel", "int4-asym-g64"]:
        plan = BitPlan.uniform(names, key, None)
        nbytes = rest + cost.plan_cost(plan, infos).weight_bytes
        rows.append({"format": f"int{key} ({wq.label})" if isinstance(key, int) else key, "bytes": nbytes})
    for r in rows:
        r["bits_per_weight"] = (r["bytes"] - rest) * 8 / weights
        r["fraction_of_fp16"] = r["bytes"] / rows[0]["bytes"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--n", type=int, default=24, help="held-out prompts (one seed each)")
    ap.add_argument("--out", default="formats_out")
    ap.add_argument("--mpq", nargs="*", default=[], help="extra config overrides for the mpq run")
    ap.add_argument("--no-sdnq", action="store_true")
    ap.add_argument("--sdxl-bytes-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sdxl_bytes_only:
        table = sdxl_bytes()
        print("\n| format (uniform, SDXL UNet) | exported bytes | bits a weight | of fp16 |\n|---|---|---|---|")
        for r in table:
            print(
                f"| {r['format']} | {r['bytes'] / 1e9:.3f} GB | {r['bits_per_weight']:.3f} | "
                f"{r['fraction_of_fp16']:.3f} |"
            )
        (out / "sdxl_bytes.json").write_text(json.dumps(table, indent=1))
        return
    t0 = time.perf_counter()
    bench = ImageBench(args.config, args.n)
    wq0 = WeightQuant.from_config(bench.cfg.quant.weight)
    cost = CostModel(2, 2, wq0)
    n_weights = sum(i.weight_numel for i in bench.infos)
    budgets = {f: cost.plan_cost(BitPlan.uniform(bench.names, f, None), bench.infos).weight_bytes for f in LEVELS}
    budget_args = [f"{b:.0f}B" for b in budgets.values()]
    fmts = ",".join(FORMATS)
    # the quality group's candidates stay at 4 bits and up, as the integer search's (4, 8): nf16, nf24, nf32
    quality = ",".join(f for f in FORMATS if parse_format(f).nominal_bits >= 4)
    tmp = Path(tempfile.mkdtemp())
    points: list[dict[str, Any]] = []
    try:
        nf_run = RunDir(tmp / "nf")
        common = [f"search.weight.budgets=[{','.join(budget_args)}]", "search.weight.target_bitwidth=4.0", *args.mpq]
        nf_extra = [
            f"quant.weight_formats=[{fmts}]",
            f"search.weight.bits_content=[2,4,8,{fmts}]",
            f"search.weight.bits_quality=[4,8,{quality}]",
            *common,
        ]
        for name in ("calib", "ptq", "sensitivity", "search", "select"):
            stage(name, nf_run.root, args.config, nf_extra)
        print(f"int + NF run done ({time.perf_counter() - t0:.0f} s)", flush=True)
        int_run = RunDir(tmp / "int")
        shutil.copytree(nf_run.root, int_run.root)
        shutil.rmtree(int_run.candidates, ignore_errors=True)
        shutil.rmtree(int_run.selection, ignore_errors=True)
        int_extra = [f"quant.weight_formats=[{fmts}]", "search.weight.bits_content=[2,4,8]", *common]
        int_extra += ["search.weight.bits_quality=[4,8]"]
        for name in ("search", "select"):
            stage(name, int_run.root, args.config, int_extra)
        print(f"int-only search done ({time.perf_counter() - t0:.0f} s)", flush=True)
        load_checkpoint(nf_run.ckpt, bench.qm)
        for label, run in (("int + NF search", nf_run), ("int-only search", int_run)):
            for budget, plan in budget_plans(run).items():
                nbytes = cost.plan_cost(plan, bench.infos).weight_bytes
                counts: dict[str, int] = {}
                for v in plan.weight.values():
                    counts[str(v)] = counts.get(str(v), 0) + 1
                points.append(
                    {"tool": label, "budget": budget, "bytes": nbytes, "formats": counts, **evaluate(bench, plan)}
                )
        for key in (4, *LEVELS):
            plan = BitPlan.uniform(bench.names, key, None)
            nbytes = cost.plan_cost(plan, bench.infos).weight_bytes
            label = f"uniform int4 ({wq0.label})" if key == 4 else f"uniform {key}"
            points.append({"tool": label, "budget": None, "bytes": nbytes, **evaluate(bench, plan)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"mpq points done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_sdnq:
        for conf in sdnq_configs():
            info: dict[str, Any] = {}

            def make(model: torch.nn.Module, conf: dict[str, Any] = conf, info: dict[str, Any] = info) -> Any:
                q = sdnq_quantize(model, conf)
                info["bytes"], info["dtypes"] = sdnq_bytes(q)
                return q

            try:
                s = score(bench, bench.images_with(make))
            except Exception as err:  # noqa: BLE001 - a peer type this SDNQ lacks: skipped, said
                print(f"{conf['label']}: skipped ({type(err).__name__}: {err})", flush=True)
                continue
            points.append({"tool": "SDNQ", "label": conf["label"], "bytes": info["bytes"], **s})
            print(f"{conf['label']}: {info['bytes']:,.0f} bytes, MSE {s['mse'].mean():.3g}", flush=True)
    report(points, budgets, n_weights, out, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


def report(points: list[dict[str, Any]], budgets: dict[str, float], n_weights: int, out: Path, args: Any) -> None:
    rows = []
    print(f"\n## {args.config}: weights only, {args.n} held-out prompts\n")
    print("| budget (bytes of) | method | bytes | bits a weight | MSE vs FP | / int-only search (95% CI) | adherence |")
    print("|---|---|---|---|---|---|---|")
    for level, limit in budgets.items():

        def at(tool: str, limit: float = limit) -> dict[str, Any] | None:
            return next(
                (q for q in points if q["tool"] == tool and q.get("budget") and abs(q["budget"] - limit) < 1), None
            )

        base = at("int-only search")
        cands: list[tuple[str, dict[str, Any]]] = []
        for tool in ("int-only search", "int + NF search"):
            p = at(tool)
            if p is not None:
                cands.append((tool, p))
        for p in points:
            if p["tool"].startswith("uniform") and p["bytes"] <= limit * (1 + 1e-9):
                cands.append((p["tool"], p))
        sd = [p for p in points if p["tool"] == "SDNQ" and p["bytes"] <= limit * (1 + 1e-9)]
        if sd:
            best = min(sd, key=lambda p: p["mse"].mean())
            cands.append((f"SDNQ best ({best['label'][5:]})", best))
        for label, p in cands:
            ratio = ""
            if base is not None and p is not base:
                r, lo, hi = paired_bootstrap_ratio(p["mse"], base["mse"])
                ratio = f"{r:.2f} ({lo:.2f}-{hi:.2f})"
            adh = "n/a" if p.get("adherence") is None else f"{p['adherence']:.0%}"
            print(
                f"| {level} ({limit:,.0f}) | {label} | {p['bytes']:,.0f} | {p['bytes'] * 8 / n_weights:.2f} | "
                f"{p['mse'].mean():.3g} | {ratio} | {adh} |"
            )
            rows.append(
                {
                    "level": level,
                    "limit": limit,
                    "method": label,
                    "bytes": p["bytes"],
                    "mse": float(p["mse"].mean()),
                    "ratio": ratio,
                    "adherence": p.get("adherence"),
                    "formats": p.get("formats"),
                }
            )
    for p in points:
        if p.get("formats"):
            print(f"{p['tool']} at {p['budget']:,.0f} bytes: {p['formats']}")
    data = {
        "config": args.config,
        "n": args.n,
        "budgets": budgets,
        "rows": rows,
        "points": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in points],
    }
    (out / f"formats_{args.config}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
