"""Shared harness of the image benchmarks (quantizers, peers): one pipeline, held-out prompts, FP references.

Images are scored against the FP pipeline's images of the same prompts and seeds, which are neither the
calibration prompts nor its seeds (the held-out scenes of the embedded model, seeds from 10,000), so no
tool tuned anything on them. Bytes are counted one way for every tool: packed integers at their bits plus
every stored scale and zero point/offset at 2 bytes, a layer left FP at 2 bytes an element, over the
quantizable Linear/Conv2d layers of the denoiser.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpq.calibration.ptq import prepare
from mpq.calibration.record import CalibData
from mpq.commands.main import main as mpq_main
from mpq.cost import CostModel
from mpq.images import PromptEmbeddings, generate, to_array
from mpq.layers import describe
from mpq.metrics import image_mse
from mpq.models import denoiser_of, load_pipeline
from mpq.plan import BitPlan
from mpq.prompts import read_prompts
from mpq.quant.model import QuantModel
from mpq.quant.quantizer import WeightQuant
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir

EVAL_SEED = 10_000


class ImageBench:
    """The FP pipeline of ``config``, its FP images of ``n`` held-out prompts, and a calibration run for mpq."""

    def __init__(self, config: str = "tiny-sdxl", n: int = 48, prompts: str = "builtin:shapes-heldout") -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.run = RunDir(Path(self.tmp.name) / "run")
        self.cfg = load_config(config, ["model.dtype=fp32"])
        assert mpq_main(["calib", "--config", config, "--outdir", str(self.run.root)]) == 0
        self.calib = CalibData.open(self.run)
        self.pipe = load_pipeline(self.cfg, dtype=torch.float32)
        self.fp_denoiser = copy.deepcopy(denoiser_of(self.pipe))
        listed = read_prompts(prompts, "prompts")
        self.prompts = [listed[i % len(listed)] for i in range(n)]
        self.seeds = [EVAL_SEED + i for i in range(n)]
        self.text = PromptEmbeddings(self.pipe, self.cfg)
        self.refs = self.images()
        self.qm = QuantModel(denoiser_of(self.pipe))
        prepare(self.qm, self.calib, self.cfg)
        self.infos = describe(self.qm, [])
        self.names = self.qm.names

    def images(self) -> np.ndarray:
        out = generate(self.pipe, self.prompts, self.seeds, self.cfg, output_type="pil", text=self.text)
        return to_array(out)

    def mse(self) -> np.ndarray:
        """Per-image MSE of the pipeline as it is now against FP."""
        return image_mse(self.images(), self.refs)

    # -------------------------------------------------------------- mpq
    def calibrate(self, wq: WeightQuant, bits: list[int], formats: list[str] | None = None) -> None:
        """mpq's weight quantizer ``wq`` at ``bits`` (and the weight ``formats``) on every layer (weights only: no
        activation pass)."""
        self.qm.prepare(bits, False, self._structure(), wq, formats or ())
        for layer in self.qm.layers.values():
            layer.calibrate_weight()

    def _structure(self) -> Any:
        from mpq.quant.structure import Structure

        return Structure(
            {n: lay.act_numel for n, lay in self.qm.layers.items()},
            {n: lay.in_split for n, lay in self.qm.layers.items()},
            {n for n, lay in self.qm.layers.items() if lay.bos_aware},
        )

    def plan_mse(self, plan: BitPlan) -> np.ndarray:
        """Per-image MSE of a plan (weights and activations) with the calibrated quantizer (FP again after)."""
        self.qm.apply(plan)
        try:
            return self.mse()
        finally:
            self.qm.set_fp()

    def mpq_point(self, plan: BitPlan, wq: WeightQuant) -> tuple[float, np.ndarray]:
        """(bytes, per-image MSE) of a weight plan with the calibrated quantizer."""
        return weight_bytes(plan, self.infos, wq), self.plan_mse(plan)

    # -------------------------------------------------------------- any other tool
    def with_denoiser(self, make: Callable[[torch.nn.Module], torch.nn.Module]) -> np.ndarray:
        """Per-image MSE with the denoiser replaced by ``make(fresh FP copy)`` (restored after)."""
        return image_mse(self.images_with(make), self.refs)

    def images_with(self, make: Callable[[torch.nn.Module], torch.nn.Module]) -> np.ndarray:
        """The held-out images with the denoiser replaced by ``make(fresh FP copy)`` (restored after)."""
        from mpq.families import family_of

        name = family_of(self.pipe).component
        keep = getattr(self.pipe, name)
        setattr(self.pipe, name, make(copy.deepcopy(self.fp_denoiser)))
        try:
            return self.images()
        finally:
            setattr(self.pipe, name, keep)


def weight_bytes(plan: BitPlan, infos: list[Any], wq: WeightQuant) -> float:
    """mpq's bytes of a weight plan: packed integers + every scale/offset at 2 bytes, FP layers at 2 bytes."""
    return CostModel(2, 2, wq).plan_cost(plan, infos).weight_bytes


def adherence(bench: ImageBench, images: np.ndarray) -> float:
    """Prompt adherence of ``images`` (the embedded judge), as a fraction."""
    from mpq.report.evaluate import score_images

    adh = score_images(images, bench.refs, bench.prompts).get("adherence")
    return float(adh["all"]) if adh else float("nan")


def mpq_points(
    bench: ImageBench, config: str, overrides: list[str], limits: list[float], wq: WeightQuant, t0: float
) -> tuple[list[dict[str, Any]], RunDir]:
    """mpq's weight stages (calib .. select) with ``overrides`` in a temp run; at each byte limit the candidate its
    selection ranks best on the calibration prompts (chosen without the evaluation images), scored on them."""
    import time

    run = RunDir(Path(tempfile.mkdtemp()) / "run")
    for stage in ("calib", "ptq", "sensitivity", "search", "select"):
        assert mpq_main([stage, "--config", config, "--outdir", str(run.root), *overrides]) == 0, stage
    print(f"mpq run: {time.perf_counter() - t0:.0f} s", flush=True)
    points, n = selected_points(bench, run, limits, wq)
    print(f"mpq: {n} candidates, {len(points)} picked ({time.perf_counter() - t0:.0f} s)", flush=True)
    return points, run


def selected_points(
    bench: ImageBench, run: RunDir, limits: list[float], wq: WeightQuant, **extra: Any
) -> tuple[list[dict[str, Any]], int]:
    """(at each byte limit the weight candidate a finished run's selection ranks best on the calibration prompts,
    chosen without the evaluation images, scored on them; how many candidates selection scored)."""
    from mpq.plan import read_plan
    from mpq.selection import read_scores

    scores = read_scores(run.scores("weight"))  # selection's own MSE (calibration prompts)
    picked = {best.plan_file: best.mse for best in (best_scored(scores, limit) for limit in limits) if best}
    points = [
        scored_point(bench, BitPlan(read_plan(run.scored_plan("weight", f))), wq, label=f, select_mse=m, **extra)
        for f, m in picked.items()
    ]
    return points, len(scores)


def best_scored(scores: list[Any], limit: float) -> Any | None:
    """The plan selection scored best (lowest MSE on the calibration prompts) at no more than ``limit`` bytes."""
    fit = [s for s in scores if s.bytes <= limit * (1 + 1e-9)]
    return min(fit, key=lambda s: s.mse) if fit else None


def scored_point(bench: ImageBench, plan: BitPlan, wq: WeightQuant, **fields: Any) -> dict[str, Any]:
    """A weight plan of mpq's as a benchmark point: its bytes, its per-image MSE and adherence on the evaluation
    images, and ``fields`` (label, select_mse, ...)."""
    bench.qm.apply(plan)
    try:
        images = bench.images()
    finally:
        bench.qm.set_fp()
    return {
        "tool": "mpq",
        **fields,
        "bytes": weight_bytes(plan, bench.infos, wq),
        "mse": image_mse(images, bench.refs),
        "adherence": adherence(bench, images),
    }


def refined_points(
    bench: ImageBench, run: RunDir, limits: list[float], wq: WeightQuant, evals: int, label: str
) -> list[dict[str, Any]]:
    """At each byte limit, the selected plan refined as selection refines its chosen one (``select.refine_evals``:
    :func:`mpq.selection.refine_plan`), scored on the evaluation images (setting ``<label> + refine``)."""
    import time

    from mpq.plan import read_plan
    from mpq.selection import open_session, read_scores, refine_plan, refine_problem

    cfg = run.load_config()
    cfg.select.refine_evals = evals
    scores = read_scores(run.scores("weight"))
    session = open_session(cfg, run)
    out = []
    for limit in limits:
        best = best_scored(scores, limit)
        if best is None:
            continue
        start = read_plan(run.scored_plan("weight", best.plan_file))
        t0 = time.perf_counter()
        r = refine_plan(session, refine_problem(cfg, run, start), start, best.mse, limit, show=False)
        took = time.perf_counter() - t0
        moves = len(r.trail) - 1
        print(f"  refine @{limit:,.0f}: {best.mse:.4g} -> {r.value:.4g}, {r.evals} evals, {moves} moves, {took:.0f} s")
        name = f"refined {best.plan_file} ({moves} moves)"
        point = scored_point(bench, BitPlan(r.plan), wq, setting=f"{label} + refine", label=name, select_mse=r.value)
        out.append({**point, "refine_seconds": took, "plan": dict(r.plan)})
    return out


def runtime_parser(doc: str, out: str) -> Any:
    """The options of the benchmarks that set mpq's plan against a runtime's own files (SDNQ, GGUF)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-sdxl")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts (one seed each)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--mpq", nargs="*", default=[], help="extra config overrides for the mpq run")
    return ap
