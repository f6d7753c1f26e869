"""The report's figures (matplotlib, Agg): sensitivity per layer, the program's Pareto front, the candidates as
selection scored them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpq.runner.choices import KINDS
from mpq.runner.files import write_with
from mpq.search.candidates import Candidate
from mpq.search.mixdq_files import MAX_SQNR_DB


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    _pyplot().close(fig)
    return path


def plot_sensitivity(
    path: Path,
    kind: str,
    metric: str,
    values: Mapping[str, Sequence[float]],
    bits: Sequence[int],
    groups: Mapping[str, str],
) -> Path:
    """Each layer's score at each candidate bit, in module order, colored by group."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(8, len(names) / 25), 4.2))
    markers = ["v", "s", "o", "^", "D"]
    colors = {"content": "tab:orange", "quality": "tab:blue"}
    for bi, b in enumerate(bits):
        for g, color in colors.items():
            idx = [i for i, n in enumerate(names) if groups.get(n) == g]
            if idx:
                y = [min(values[names[i]][bi], MAX_SQNR_DB) for i in idx]
                ax.scatter(
                    idx,
                    y,
                    s=12,
                    marker=markers[bi % len(markers)],
                    color=color,
                    alpha=0.5 + 0.5 * bi / max(1, len(bits) - 1),
                    label=f"{g}, {b} bit",
                )
    ax.set_xlabel("layer index (module order)")
    ax.set_ylabel("SQNR of denoiser output (dB)" if metric == "sqnr" else "SSIM vs FP image")
    ax.set_title(f"{kind} sensitivity, {metric.upper()}: each layer quantized alone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(bits), loc="lower left")
    fig.tight_layout()
    return _save(fig, path, 100)


def front_2d(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front of (cost, value) points, lower cost and higher value better: in order of cost, each point
    whose value beats every cheaper point's (of equal costs, the best value only)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(rows: Sequence[Candidate], path: Path, chosen: Mapping[str, str] | None = None) -> Path:
    """Bytes vs combined normalized objective per kind; the front of these two (a staircase) drawn; a chosen plan
    starred."""
    plt = _pyplot()
    kinds = [k for k in KINDS if any(r.kind == k and r.feasible for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6 * max(1, len(kinds)), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = [r for r in rows if r.kind == kind and r.feasible]
        x = np.array([r.bytes / 2**20 for r in pts])
        y = np.array([r.objective for r in pts])
        sc = ax.scatter(x, y, c=[r.K for r in pts], cmap="viridis", s=18, label="candidates")
        front = front_2d(list(zip(x.tolist(), y.tolist())))
        ax.step(*zip(*front), where="post", color="crimson", lw=1.2, label="Pareto front")
        sel = [(xi, yi) for xi, yi, r in zip(x, y, pts) if chosen and r.plan_file == chosen.get(kind)]
        if sel:
            ax.scatter(*sel[0], marker="*", s=220, color="gold", edgecolor="black", zorder=5, label="chosen")
        fig.colorbar(sc, ax=ax, label="K")
        ax.set_xlabel(f"{kind} bytes (MiB)" + (" per sample, summed over layers" if kind == "act" else ""))
        ax.set_ylabel("normalized objective (content + quality)")
        ax.set_title(f"{kind} candidates ({pts[0].mode} mode)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_selection(
    scores: Mapping[str, Sequence[Any]],
    uniform: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    curves: Mapping[str, Sequence[Any]] | None = None,
) -> Path:
    """Per kind: every scored candidate's selection MSE vs FP (log) against its bytes, the uniform reference plans
    marked and labelled, the chosen candidate starred; ``curves``: what each budget costs (the best at no more
    bytes) as a step line."""
    plt = _pyplot()
    kinds = [k for k in KINDS if scores.get(k)]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6 * max(1, len(kinds)), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = scores[kind]
        ax.scatter(
            [r.bytes / 2**20 for r in rows],
            [max(r.mse, 1e-12) for r in rows],
            s=18,
            color="tab:blue",
            label="candidates",
        )
        curve = (curves or {}).get(kind) or []
        if curve:
            xs = [p.bytes / 2**20 for p in curve] + [max(r.bytes for r in rows) / 2**20]
            ys = [max(p.mse, 1e-12) for p in curve]
            ax.step(xs, ys + ys[-1:], where="post", color="tab:blue", alpha=0.5, label="best at no more bytes")
        best = [r for r in rows if r.chosen]
        if best:
            ax.scatter(
                best[0].bytes / 2**20,
                max(best[0].mse, 1e-12),
                marker="*",
                s=240,
                color="gold",
                edgecolor="black",
                zorder=5,
                label="chosen",
            )
        for u in uniform.get(kind, []):
            ax.scatter(u["bytes"] / 2**20, max(u["mse"], 1e-12), marker="s", s=36, color="tab:red", zorder=4)
            ax.annotate(
                u["label"],
                (u["bytes"] / 2**20, max(u["mse"], 1e-12)),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        if uniform.get(kind):
            ax.scatter([], [], marker="s", color="tab:red", label="uniform")
        ax.set_yscale("log")
        ax.set_xlabel(f"{kind} bytes (MiB)" + (" per sample" if kind == "act" else ""))
        ax.set_ylabel("selection images: MSE vs FP")
        ax.set_title(f"{kind} candidates as selection scored them")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


PEER_STYLES = {"mpq": ("o", "tab:blue"), "mpq uniform": ("s", "tab:green"), "MixDQ uniform": ("x", "tab:gray")}


def plot_peers(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """A peer benchmark's points (``benchmarks/bench_peers.py``'s ``peers.json``): image MSE vs FP (log) against
    weight bytes, one marker per tool (uniform plans joined by a line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tools = list(dict.fromkeys(str(p["tool"]) for p in points))
    for n, tool in enumerate(tools):
        marker, color = PEER_STYLES.get(tool, ("^v<>Dph"[n % 7], f"C{3 + n % 7}"))
        pts = sorted((p for p in points if p["tool"] == tool), key=lambda p: float(p["bytes"]))
        ax.plot(
            [float(p["bytes"]) / 1e3 for p in pts],
            [max(float(p["mean_mse"]), 1e-12) for p in pts],
            marker,
            color=color,
            label=tool,
            alpha=0.85,
            linestyle="-" if "uniform" in tool else "",
        )
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes (KB; packed + scales and zero points at 2 bytes)")
    ax.set_ylabel("image MSE vs FP (held-out prompts)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 120)


MODE_TITLES = {"end_to_end": "end to end (error accumulated)", "isolated": "isolated (own error, FP inputs)"}


def _capped(values: Sequence[float], cap: float) -> list[float]:
    return [cap if not math.isfinite(v) or v > cap else v for v in values]


def plot_trace_layers(trace: Mapping[str, Any], path: Path) -> Path:
    """A precision trace's per-layer SQNR against layer execution order, one line per sampling step, one panel
    per mode; exact layers (+inf) drawn at the top edge."""
    plt = _pyplot()
    modes = [m for m in trace["modes"] if trace["layers"].get(m)]
    fig, axes = plt.subplots(len(modes) or 1, 1, figsize=(10, 3.6 * max(1, len(modes))), squeeze=False)
    finite = [r["sqnr_db"] for m in modes for r in trace["layers"][m] if math.isfinite(r["sqnr_db"])]
    cap = (max(finite) + 10.0) if finite else 100.0
    cmap = plt.get_cmap("viridis")
    for ax, mode in zip(axes[:, 0], modes):
        rows = trace["layers"][mode]
        steps = sorted({r["step"] for r in rows})
        for k, step in enumerate(steps):
            pts = sorted((r for r in rows if r["step"] == step), key=lambda r: r["order"])
            ax.plot(
                [r["order"] for r in pts],
                _capped([r["sqnr_db"] for r in pts], cap),
                lw=1.0,
                marker=".",
                ms=3,
                color=cmap(k / max(1, len(steps) - 1)),
                label=f"step {step}",
            )
        ax.axhline(cap, color="gray", lw=0.6, ls=":")
        ax.set_ylabel("SQNR vs FP (dB)")
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}; top line: exact")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(steps), 8), loc="lower left")
    axes[-1, 0].set_xlabel("layer (execution order)")
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_trace_components(trace: Mapping[str, Any], path: Path) -> Path:
    """A precision trace's SQNR per component call (text encoders, the denoiser and the scheduler at each step, the
    VAE decode), one panel per mode; exact calls drawn at the right edge and hatched."""
    plt = _pyplot()
    modes = [m for m in trace["modes"] if trace["components"].get(m)]
    n = max((len(trace["components"][m]) for m in modes), default=1)
    fig, axes = plt.subplots(1, len(modes) or 1, figsize=(6 * max(1, len(modes)), 0.28 * n + 1.6), squeeze=False)
    finite = [r["sqnr_db"] for m in modes for r in trace["components"][m] if math.isfinite(r["sqnr_db"])]
    cap = (max(finite) + 10.0) if finite else 100.0
    for ax, mode in zip(axes[0], modes):
        rows = trace["components"][mode]
        y = np.arange(len(rows))
        vals = _capped([r["sqnr_db"] for r in rows], cap)
        kinds = list(dict.fromkeys(r["component"] for r in rows))
        bars = ax.barh(y, vals, color=[f"C{kinds.index(r['component']) % 10}" for r in rows])
        for bar, r in zip(bars, rows):
            if not math.isfinite(r["sqnr_db"]):
                bar.set_hatch("//")
                bar.set_alpha(0.4)
        ax.set_yticks(y, [r["id"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR vs FP (dB); hatched: exact")
        ax.set_title(MODE_TITLES.get(mode, mode))
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path, 110)
