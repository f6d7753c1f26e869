"""``mpq sensitivity``: the stage, or (``--sensitivity_type/--metric/--method``) the named files only."""

from __future__ import annotations

import argparse

from mpq.commands.options import resolve_run
from mpq.commands.pipeline import run_stage_command, stage_command
from mpq.commands.registry import Command
from mpq.runner.choices import KINDS, METHODS, METRICS


def handle(args: argparse.Namespace) -> None:
    """The stage, or (with --sensitivity_type/--metric/--method) the named files only, outside the stamps."""
    if not (args.sensitivity_type or args.metric or args.method):
        return run_stage_command(args)
    from mpq.sensitivity.stage import run_sensitivity

    cfg, run = resolve_run(args)
    kinds = (args.sensitivity_type,) if args.sensitivity_type else KINDS
    metrics = (args.metric,) if args.metric else METRICS
    with run.lock("mpq sensitivity"):
        run_sensitivity(cfg, run, kinds, metrics, args.method, force=args.force)
    return None


def _arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Without --sensitivity_type/--metric/--method: the stage, all four files (skipped when up to date). "
        "With them: those files only. Partial results are saved as it goes; re-running resumes where a killed run "
        "stopped."
    )
    p.add_argument("--sensitivity_type", "--kind", dest="sensitivity_type", choices=KINDS, default=None)
    p.add_argument("--metric", choices=METRICS, default=None)
    p.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="exact: fast (FP prefix cache, same numbers) or naive; estimates: local (each layer's own output SQNR), "
        "fisher (gradient-weighted error of the denoising loss) or hybrid (an estimate, exact where uncertain)",
    )


def command(help_text: str) -> Command:
    """The stage command with its options."""
    return stage_command("sensitivity", help_text, handle, _arguments)
