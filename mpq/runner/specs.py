"""Each stage declared once: the config keys its outputs depend on, the stages it reads, its outputs.

The stamps (:meth:`~mpq.runner.rundir.RunDir.stage_state`), the signatures of sensitivity's and selection's
resumable work and their done markers (:mod:`mpq.runner.sharded`) all read a stage's keys from its
:class:`~mpq.runner.rundir.StageSpec` here; the outputs are :class:`~mpq.runner.rundir.RunDir`'s paths. The
command registry (:mod:`mpq.commands.stages`) adds only how to run each stage and its help.
"""

from __future__ import annotations

from pathlib import Path

from mpq.runner.choices import KINDS, METRICS
from mpq.runner.rundir import RunDir, StageSpec

MODEL = ("model.id", "model.variant")


def _calib_outputs(run: RunDir) -> tuple[Path, ...]:
    return (run.calib_meta, run.calib, run.fp_images)


def _ptq_outputs(run: RunDir) -> tuple[Path, ...]:
    return (run.ckpt,)


def _sensitivity_outputs(run: RunDir) -> tuple[Path, ...]:
    return tuple(run.sensitivity_file(k, m) for k in KINDS for m in METRICS)


def _search_outputs(run: RunDir) -> tuple[Path, ...]:
    return (run.candidate_table, *(run.candidate_folder(k) for k in KINDS), run.act_protect)


def _select_outputs(run: RunDir) -> tuple[Path, ...]:
    return (
        run.final_weight,
        run.final_act,
        run.final_protect,
        *(run.scores(k) for k in KINDS),
        *(run.budgets(k) for k in KINDS),
        *(run.curve(k) for k in KINDS),
    )


def _final_outputs(run: RunDir) -> tuple[Path, ...]:
    return (run.generated_images,)


def _report_outputs(run: RunDir) -> tuple[Path, ...]:
    return (run.report_page, run.summary)


CALIB = StageSpec(
    "calib", MODEL + ("model.dtype", "sampling", "calib.num_samples", "calib.prompts_file"), (), _calib_outputs
)
PTQ = StageSpec("ptq", MODEL + ("sensitivity.dtype", "quant", "calib.batch_size"), ("calib",), _ptq_outputs)
SENSITIVITY = StageSpec(
    "sensitivity",
    MODEL + ("sampling", "quant", "groups", "sensitivity"),
    ("ptq",),
    _sensitivity_outputs,
    bookkeeping=("sensitivity.save_every_s", "sensitivity.cache_budget_mb"),
    variants=("sensitivity.method", "sensitivity.estimator", "sensitivity.hybrid_fraction", "sensitivity.share_bits"),
)
SEARCH = StageSpec(
    "search",
    MODEL
    + (
        "search",
        "quant.bits",
        "quant.weight",
        "quant.split_shortcut",
        "quant.act.bos_aware",
        "groups",
        "sampling.resolution",
        "model.dtype",
    ),
    ("sensitivity",),
    _search_outputs,
)
SELECT = StageSpec(
    "select",
    MODEL
    + (
        "select",
        "sampling",
        "model.dtype",
        "search.protect_weights",
        "search.weight.target_bitwidth",
        "search.weight.budgets",
        "search.act.target_bitwidth",
        "search.act.budgets",
    ),
    ("search",),
    _select_outputs,
)
FINAL = StageSpec("final", MODEL + ("infer.num_images", "sampling", "model.dtype"), ("select",), _final_outputs)
REPORT = StageSpec(
    "report",
    MODEL + ("eval", "select.num_images", "sampling", "model.dtype"),
    ("sensitivity", "search", "select", "final"),
    _report_outputs,
)

SPECS: dict[str, StageSpec] = {s.name: s for s in (CALIB, PTQ, SENSITIVITY, SEARCH, SELECT, FINAL, REPORT)}
