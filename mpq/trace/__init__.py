"""Precision traces: where a quantized or exported pipeline departs from FP, per component, per step, per layer
(``mpq trace``), and dumps of every component's inputs and outputs for other runtimes, compared tensor by tensor.

    from mpq.trace import trace
    t = trace(cfg, run, plan=mpq.BitPlan.uniform(names, 4, 8), out="outputs/tiny-sdxl/trace")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.plan import BitPlan
from mpq.runner.outputs import check_output_folder
from mpq.trace.dump import DUMP, Comparison, compare_dumps, write_dump
from mpq.trace.files import TRACE, read_trace, write_trace
from mpq.trace.run import MODES, Sides, TraceRequest, export_sides, plan_sides, run_trace, summary_lines

__all__ = ["MODES", "Comparison", "compare_dumps", "read_trace", "summary_lines", "trace", "trace_prompt"]


def trace_prompt(run: Any, prompt: str | None, seed: int | None, cfg: DictConfig) -> tuple[str, int]:
    """The traced prompt and seed: the given ones, else the run's first calibration prompt and its seed (so the
    trace's image is the run's first FP image)."""
    if prompt is not None:
        return prompt, int(cfg.sampling.seed if seed is None else seed)
    from mpq.calibration.record import calib_prompts

    if not run.calib_meta.is_file():
        raise MpqError(f"give --prompt, or run `mpq calib --base_path {run.root}` first (its first prompt is traced)")
    prompts, seeds = calib_prompts(run)
    return prompts[0], int(seeds[0] if seed is None else seed)


def trace(
    cfg: DictConfig,
    run: Any,
    plan: BitPlan | None = None,
    label: str = "plan",
    export: str | Path | None = None,
    export_dtype: torch.dtype = torch.float32,
    prompt: str | None = None,
    seed: int | None = None,
    modes: tuple[str, ...] = MODES,
    layers: str | None = "",
    dump: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Trace ``plan`` (fake-quant, on the run's checkpoint) or the ``export`` folder against the run's FP pipeline;
    writes ``out`` (default ``RUN/trace``) and, with ``dump``, the quantized run's component tensors. Returns the
    trace (``"files"``: what was written)."""
    if (plan is None) == (export is None):
        raise MpqError("trace a plan or an export folder (one of them)")
    own = run.trace
    out = check_output_folder(out if out is not None else own, "--out", TRACE, run.root, own_folder=own)
    dump = check_output_folder(dump, "--dump", DUMP, run.root) if dump is not None else None
    p, s = trace_prompt(run, prompt, seed, cfg)
    sides: Sides = export_sides(cfg, export, export_dtype) if export is not None else plan_sides(cfg, run, plan, label)
    t = run_trace(cfg, sides, TraceRequest(p, s, tuple(modes), layers, Path(dump) if dump else None))
    files = write_trace(out, t)
    if dump is not None:
        meta = {k: t[k] for k in ("config", "model", "prompt", "seed", "steps", "guidance_scale", "quantized")}
        files.append(write_dump(dump, t.pop("_calls", []), meta) / "manifest.json")
    t["files"] = [str(f) for f in files]
    return t
