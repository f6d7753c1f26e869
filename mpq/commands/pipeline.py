"""``mpq <stage>`` (calib, ptq, sensitivity, search, select, final, report) and ``mpq run``: the stages of the
registry, each run after the stages it needs, with a summary of what it made."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mpq.commands.options import add_config_args, add_run_args, resolve_run
from mpq.commands.registry import Command, Handler
from mpq.runner.rundir import RunDir

SHARDABLE = ("sensitivity", "select", "run")  # commands that take --nproc


def stage_arguments(name: str, stage: str | None = None) -> Callable[[argparse.ArgumentParser], None]:
    """The options every stage command has (config, overrides, run directory, --force, --seed; --nproc where the
    work is sharded); ``stage`` is the stage it runs through (default ``name``)."""

    def add(p: argparse.ArgumentParser) -> None:
        add_config_args(p, required=False)
        add_run_args(p)
        p.set_defaults(stage=stage or name)
        if name in SHARDABLE:
            p.add_argument(
                "--nproc",
                type=int,
                default=None,
                metavar="N",
                help="shard the work over N local processes (one per GPU when GPUs are visible, else CPU with gloo): "
                "the same as `torchrun --nproc_per_node N -m mpq ...`; the files are bit-identical to one process "
                "with as many threads as each rank",
            )

    return add


def _select_summary(run: RunDir, result: Any) -> str:
    from mpq.runner.files import read_records
    from mpq.selection import BudgetBest, refine_line, refine_summary

    lines = []
    for kind, r in result.items():
        lines.append(
            f"{kind}: chose {r.plan_file} (MSE {r.mse:.6g}, SSIM {r.ssim:.6f}, PSNR {r.psnr:.2f} dB; {r.bytes:,.0f} "
            "bytes)"
        )
        ref = refine_summary(run, kind)
        if ref:
            lines.append(refine_line(ref))
        table = run.budgets(kind)
        for b in read_records(table, BudgetBest, "re-run `mpq select`")[1:] if table.is_file() else []:
            best = f"{b.plan_file} (MSE {b.mse:.6g}, {b.bytes:,.0f} bytes)" if b.plan_file else "no candidate fits"
            lines.append(f"  best at budget {b.budget} ({b.budget_bytes:,.0f} bytes): {best}")
    return "\n".join(lines)


def _search_summary(run: RunDir, result: Any) -> str:
    from mpq.search.oneoff import sweep_summary

    return sweep_summary(result, run.candidates)


SUMMARIES: dict[str, Callable[[RunDir, Any], str]] = {"select": _select_summary, "search": _search_summary}


def _describe(name: str, run: RunDir, result: Any) -> None:
    from mpq.commands.stages import STAGES

    if result and name in SUMMARIES:
        print(SUMMARIES[name](run, result))
    from mpq.plan import plan_file

    # a plan with weight formats is in its .formats.yaml twin: name the file that is there
    print(f"{name}: " + ", ".join(str(plan_file(o)) for o in STAGES[name].outputs(run)))


def run_stage_command(args: argparse.Namespace) -> None:
    """``mpq <stage>``: the stage, after the upstream stages whose outputs are missing."""
    from mpq.commands.stages import Context, run_through

    cfg, run = resolve_run(args)
    _describe(args.stage, run, run_through(args.stage, Context(cfg, run), force=args.force, rebuild_stale=False))


def run_all(args: argparse.Namespace) -> None:
    """``mpq run``: every stage, skipping what is up to date; then the headline numbers."""
    from mpq.commands.stages import Context, run_through
    from mpq.report.report import read_summary, summary_lines

    cfg, run = resolve_run(args)
    run_through("report", Context(cfg, run), force=args.force, command="mpq run")
    print("\n".join(summary_lines(run, read_summary(run))))


def stage_command(
    name: str,
    help_text: str,
    handler: Handler = run_stage_command,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> Command:
    """A stage's command: the common stage options, then ``extra``'s."""
    common = stage_arguments(name)

    def add(p: argparse.ArgumentParser) -> None:
        common(p)
        if extra is not None:
            extra(p)

    return Command(
        name, help_text, add, handler, description or help_text + ". Stages it needs that are not up to date run first."
    )


RUN = Command(
    "run",
    "the whole flow: every stage (up-to-date ones skipped), then the headline numbers",
    stage_arguments("run", stage="report"),
    run_all,
    "calib, ptq, sensitivity, search, select, final, report; stages whose outputs are up to date are skipped and an "
    "interrupted stage resumes. --force re-runs the report.",
)
