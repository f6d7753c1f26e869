"""The stages of a run, as one registry, and the runner that skips what is up to date.

Each :class:`Stage` is a stage's one declaration (:mod:`mpq.runner.specs`: the
config keys its outputs depend on, the stages whose outputs it reads, the files
it owns) with ``run(ctx)`` and its help. The CLI
(``mpq <stage>``, ``mpq run``) and the freshness stamps are derived from it.
A stage is up to date when its stamp matches (config keys + upstream stamps)
and its outputs exist; running a stage first runs its upstream stages that
are not (like ``make``); ``--force`` re-runs the named stage itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.runner import distributed, specs
from mpq.runner.rundir import RunDir, StageSpec


class Context:
    """What a stage runs with: the config, the run directory, and the pipeline, loaded once on first use
    (one dtype at a time: asking for another dtype drops the one held)."""

    def __init__(self, cfg: DictConfig, run: RunDir, show: bool = True) -> None:
        self.cfg, self.run, self.show = cfg, run, show
        self.force = False  # the stage being run was asked to re-make its outputs (--force)
        self._pipe: Any = None
        self._dtype: torch.dtype | None = None

    def pipe(self, dtype: torch.dtype | None = None) -> Any:
        from mpq.models import load_pipeline, torch_dtype

        dtype = dtype or torch_dtype(self.cfg.model.dtype)
        if self._pipe is None or self._dtype != dtype:
            self._pipe = None  # free the other dtype's weights first
            self._pipe, self._dtype = load_pipeline(self.cfg, dtype=dtype), dtype
        return self._pipe

    def stats_pipe(self) -> Any:
        """The pipeline in ``sensitivity.dtype``: PTQ statistics and sensitivity."""
        from mpq.models import torch_dtype

        return self.pipe(torch_dtype(self.cfg.sensitivity.dtype))


@dataclass(frozen=True)
class Stage(StageSpec):
    """A stage's declaration (:mod:`mpq.runner.specs`) with its help and how it runs."""

    help: str = ""
    run: Callable[[Context], Any] = lambda ctx: None

    @classmethod
    def of(cls, spec: StageSpec, help: str, run: Callable[[Context], Any]) -> Stage:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(StageSpec)}, help=help, run=run)


def _calib(ctx: Context) -> Any:
    from mpq.calibration.record import run_calibration

    return run_calibration(ctx.cfg, ctx.run, ctx.pipe())


def _ptq(ctx: Context) -> Any:
    from mpq.calibration.ptq import run_ptq

    return run_ptq(ctx.cfg, ctx.run, ctx.stats_pipe())


def _sensitivity(ctx: Context) -> Any:
    from mpq.sensitivity.stage import run_sensitivity

    return run_sensitivity(ctx.cfg, ctx.run, pipe=ctx.stats_pipe(), show=ctx.show, force=ctx.force)


def _search(ctx: Context) -> Any:
    from mpq.search.sweep import run_search

    return run_search(ctx.cfg, ctx.run, show=ctx.show)


def _select(ctx: Context) -> Any:
    from mpq.selection import run_selection

    return run_selection(ctx.cfg, ctx.run, ctx.pipe(), show=ctx.show, force=ctx.force)


def _final(ctx: Context) -> Any:
    from mpq.final import run_final

    return run_final(ctx.cfg, ctx.run, ctx.pipe())


def _report(ctx: Context) -> Any:
    from mpq.report.report import build_report

    return build_report(ctx.cfg, ctx.run, ctx.pipe())


# the declarations (config keys, upstream, outputs) are mpq.runner.specs'; here: how each runs, and its help
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage.of(specs.CALIB, "run the FP pipeline; record denoiser I/O per step and FP reference images", _calib),
        Stage.of(specs.PTQ, "calibrate W and A quant params for every candidate bit in one pass", _ptq),
        Stage.of(
            specs.SENSITIVITY,
            "each layer quantized alone: SQNR (all layers) and SSIM (content group), W and A",
            _sensitivity,
        ),
        Stage.of(specs.SEARCH, "integer program: candidate plans over budgets x K", _search),
        Stage.of(
            specs.SELECT,
            "score every candidate plan by image MSE vs FP; choose the weight plan, then the act plan on top of it",
            _select,
        ),
        Stage.of(specs.FINAL, "generate RUN/generated_images with the selected plans", _final),
        Stage.of(specs.REPORT, "RUN/report: evaluation (MSE, adherence), plots, index.html, summary.json", _report),
    )
}
assert tuple(STAGES) == tuple(specs.SPECS)


# stages whose work is sharded over the ranks of a torchrun job; the others run on rank 0 while the rest wait
SHARDED = ("sensitivity", "select")


def run_stage(stage: Stage, ctx: Context, force: bool = False, log: Callable[[str], None] = print) -> tuple[bool, Any]:
    """Run ``stage`` unless it is up to date; stamp it when done: (whether it ran, its result). In a torchrun job
    rank 0 decides and stamps; a sharded stage runs on every rank, any other on rank 0 alone."""
    cfg, run = ctx.cfg, ctx.run
    d = distributed.current()
    fresh = d.broadcast(not force and run.is_fresh(stage, cfg) if d.is_main else None)
    if fresh:
        log(f"[{stage.name}] up to date, skipped ({run.root})")
        return False, None
    log(
        f"[{stage.name}] running ..."
        + (f" (sharded over {d.world} ranks)" if d.enabled and stage.name in SHARDED else "")
    )
    t0 = time.perf_counter()
    ctx.force = force
    result = stage.run(ctx) if d.is_main or stage.name in SHARDED else None
    seconds = time.perf_counter() - t0
    d.barrier()
    if d.is_main:
        run.mark_done(stage, cfg, seconds)
    log(f"[{stage.name}] done in {seconds:.1f} s")
    return True, result


USED_AS_IS = {
    "unstamped": "not made by this run's stages",
    "stale": "made with another config or other inputs",
    "changed": "changed since the stage made them",
}


def run_through(
    name: str,
    ctx: Context,
    force: bool = False,
    log: Callable[[str], None] = print,
    rebuild_stale: bool = True,
    command: str | None = None,
) -> Any:
    """Run every stage up to and including ``name`` (in registry order), skipping the up-to-date ones;
    ``force`` re-runs ``name`` itself. With ``rebuild_stale=False`` (a single-stage command) an upstream stage
    runs only when an output is missing (never made, or a file it made is gone): files put there by hand (e.g.
    MixDQ's sensitivity yaml) are used, with a note saying why they are not up to date. ``command`` is what the
    run directory's lock names to a second job (default ``mpq <name>``)."""
    needed = _closure(name)
    if "search" in needed and list(ctx.cfg.sensitivity.layers):  # refused before any expensive stage runs
        raise MpqError(
            f"sensitivity.layers={list(ctx.cfg.sensitivity.layers)} restricts sensitivity to a subset, but the search "
            f"needs every layer: set sensitivity.layers=[] (a subset is for `mpq sensitivity` alone)"
        )
    if "search" in needed:
        from mpq.search.build import check_target_family

        check_target_family(ctx.cfg)  # a target no plan of this family can be exported for
    result = None
    d = distributed.current()  # ranks other than 0 print to /dev/null (the CLI sets that up)
    with ctx.run.lock(command or f"mpq {name}"):
        if d.is_main:
            ctx.run.save_config(ctx.cfg)
        remade: set[str] = set()
        for stage_name in STAGES:
            if stage_name not in needed:
                continue
            stage = STAGES[stage_name]
            # a single-stage command keeps an upstream stage's existing outputs, unless one is missing or its inputs
            # were just made again
            may_keep = stage_name != name and not rebuild_stale and not any(up in remade for up in stage.upstream)
            state = d.broadcast(ctx.run.stage_state(stage, ctx.cfg) if d.is_main and may_keep else None)
            if may_keep and state != "missing":
                if state != "fresh":
                    log(
                        f"[{stage_name}] using the existing outputs, {USED_AS_IS[state]} "
                        f"(`mpq {stage_name} --force` re-makes them)"
                    )
                continue
            ran, result = run_stage(stage, ctx, force and stage_name == name, log)
            if ran:
                remade.add(stage_name)
    return result


def _closure(name: str) -> set[str]:
    out, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(STAGES[n].upstream)
    return out
