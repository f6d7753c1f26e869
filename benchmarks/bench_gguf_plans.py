"""mpq's search in ggml's types against the GGUF files people make today: uniform types and hand rules, at equal bytes.

    python benchmarks/bench_gguf_plans.py --config tiny-sdxl --out gguf_sdxl     # ~30 min on 2 CPU cores
    python benchmarks/bench_gguf_plans.py --config tiny-sd3 --out gguf_sd3

What runs (weights only, activations FP, the same pipeline, every Linear/Conv2d a candidate):

* **mpq**: ``target=gguf`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, priced at their block bytes; what a file cannot store
  in a type stays F16), calibration, sensitivity, the full-range search and selection on the calibration prompts;
  at each byte level (the bytes of each uniform file of the five, and the midpoints) the plan selection ranks
  best among the candidates at no more bytes, chosen without seeing
  the evaluation images (on SD3 and Flux the layers of a fused ``qkv`` share one type, as the file needs);
* **uniform**: every type the ``gguf`` package writes (:data:`UNIFORM`), on every layer;
* **hand rules**, as ComfyUI-GGUF and stable-diffusion.cpp users write them: a base type everywhere, and the
  first and the last block of the denoiser, its input and output layers and its embeddings (every layer outside
  a numbered block) one or two types higher on the ladder Q4_0 < Q4_1 < Q5_0 < Q5_1 < Q8_0 (:func:`hand_rule`).

At each level the best uniform or hand-rule file at no more bytes is **chosen by its evaluation MSE** (an oracle
pick: it favours them). Bytes, one way for all: each layer's weight in its type's blocks, F16 where a type cannot
store it (rows not whole blocks, convolutions); bits a weight = bytes x 8 / weights, convolutions included. MSE
per image against the FP pipeline's images of held-out prompts and seeds neither side saw; ratios mpq / best with a
paired-bootstrap 95% interval over images; prompt adherence (the embedded judge) beside MSE. Writes
``gguf_plans.json`` into ``--out``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _imagebench import ImageBench, adherence, mpq_points, runtime_parser, weight_bytes  # noqa: E402
from bench_peers import best_at  # noqa: E402

from mpq.layers import edge_layers  # noqa: E402
from mpq.metrics import image_mse, paired_bootstrap_ratio  # noqa: E402
from mpq.plan import BitPlan  # noqa: E402
from mpq.quant.formats.gguf import TYPES  # noqa: E402
from mpq.quant.quantizer import WeightQuant  # noqa: E402

UNIFORM = [f"gguf-{t}" for t in TYPES]
LADDER = ["gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0"]


def hand_rule(names: list[str], base: str, up: int) -> dict[str, str]:
    edges = edge_layers(names)
    high = LADDER[min(LADDER.index(base) + up, len(LADDER) - 1)]
    return {n: high if n in edges else base for n in names}


def measure(bench: ImageBench, plan: BitPlan) -> tuple[np.ndarray, np.ndarray]:
    bench.qm.apply(plan)
    try:
        images = bench.images()
    finally:
        bench.qm.set_fp()
    return images, image_mse(images, bench.refs)


def main() -> None:
    args = runtime_parser(__doc__, "gguf_out").parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = ImageBench(args.config, args.n)
    n_weights = sum(i.weight_numel for i in bench.infos)
    wq = WeightQuant()
    points: list[dict[str, Any]] = []

    overrides = ["target=gguf", "search.fp_bytes=2", *args.mpq]
    levels = byte_levels(list(bench.names), bench, wq)
    mpq, run = mpq_points(bench, args.config, overrides, list(levels.values()), wq, t0)
    points += mpq
    names = list(bench.names)
    files = {f"uniform {t[5:].upper()}": {n: t for n in names} for t in UNIFORM}
    for base in LADDER[:-1]:
        for up in (1, 2):
            files[f"{base[5:].upper()}, edges +{up}"] = hand_rule(names, base, up)
    for label, weights in files.items():
        plan = BitPlan(weights)
        images, mse = measure(bench, plan)
        nbytes = weight_bytes(plan, bench.infos, wq)
        points.append(
            {"tool": "file", "label": label, "bytes": nbytes, "mse": mse, "adherence": adherence(bench, images)}
        )
        print(f"{label}: {nbytes * 8 / n_weights:.2f} bits/w, MSE {mse.mean():.3g}", flush=True)

    rows = table(points, levels, n_weights, args)
    data = {
        "config": args.config,
        "n_images": args.n,
        "mpq_overrides": overrides,
        "edge_layers": sorted(edge_layers(names)),
        "byte_counting": "each weight in its type's blocks; F16 where the type cannot store it",
        "points": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in points],
        "levels": rows,
    }
    (out / "gguf_plans.json").write_text(json.dumps(data, indent=1))
    shutil.rmtree(run.root.parent, ignore_errors=True)
    print(f"\nwrote {out / 'gguf_plans.json'}; total {time.perf_counter() - t0:.0f} s", flush=True)


def byte_levels(names: list[str], bench: ImageBench, wq: WeightQuant) -> dict[str, float]:
    """The bytes of uniform Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 files, and the midpoints between neighbours (a model
    whose convolutions stay F16 has more bits a weight than the types' own)."""
    at = {t[5:].upper(): weight_bytes(BitPlan({n: t for n in names}), bench.infos, wq) for t in LADDER}
    out: dict[str, float] = {}
    keys = list(at)
    for a, b in zip(keys, keys[1:]):
        out[f"uniform {a}"] = at[a]
        out[f"between {a} and {b}"] = (at[a] + at[b]) / 2
    out[f"uniform {keys[-1]}"] = at[keys[-1]]
    return out


def table(points: list[dict[str, Any]], levels: dict[str, float], n_weights: int, args: Any) -> list[dict[str, Any]]:
    for p in points:
        p["mean_mse"] = float(np.mean(p["mse"]))
    mpq_pts = [dict(p, key=p["select_mse"]) for p in points if p["tool"] == "mpq"]
    file_pts = [p for p in points if p["tool"] == "file"]
    print(f"\n{args.config}, weight-only, {args.n} held-out prompts; bytes as a GGUF file stores the weights\n")
    print(
        "| bytes of | bits/weight | mpq plan (selection's pick) | mpq MSE | adh. | best uniform / hand rule (oracle) | "
        "MSE | adh. | mpq / best (95% CI) |"
    )
    print("|---|---:|---|---:|---:|---|---:|---:|---|")
    rows = []
    for level, limit in levels.items():
        b = limit * 8 / n_weights
        m, s = best_at(mpq_pts, limit, "key"), best_at(file_pts, limit, "mean_mse")
        if m is None or s is None:
            print(f"| {level} | {b:.2f} | {m and m['label']} | | | {s and s['label']} | | | no plan at these bytes |")
            continue
        r, lo, hi = paired_bootstrap_ratio(m["mse"], s["mse"])
        rows.append(
            {
                "level": level,
                "bits": b,
                "mpq": m["label"],
                "best": s["label"],
                "ratio": [r, lo, hi],
                "mpq_mse": m["mean_mse"],
                "best_mse": s["mean_mse"],
                "mpq_bits": m["bytes"] * 8 / n_weights,
                "best_bits": s["bytes"] * 8 / n_weights,
            }
        )
        print(
            f"| {level} | {b:.2f} | {m['label']} ({m['bytes'] * 8 / n_weights:.2f}) | {m['mean_mse']:.3g} | "
            f"{m['adherence']:.0%} "
            f"| {s['label']} ({s['bytes'] * 8 / n_weights:.2f}) | {s['mean_mse']:.3g} | {s['adherence']:.0%} | "
            f"{r:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return rows


if __name__ == "__main__":
    main()
