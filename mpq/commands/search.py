"""``mpq search``: the integer program — a run's sweep of candidate plans, or one program on MixDQ's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpq.commands.options import resolve_run
from mpq.commands.pipeline import run_stage_command, stage_command
from mpq.commands.registry import Command
from mpq.errors import MpqError
from mpq.runner.choices import KINDS


def handle(args: argparse.Namespace) -> None:
    """The run's sweep (the search stage), or one program on MixDQ's files, one K, or a plan against the optimum."""
    from mpq.runner.config import build_config
    from mpq.search.oneoff import MixdqFiles, SolveRequest, solve

    ref_files = [args.sensitivity_ssim, args.sensitivity_sqnr, args.para_size_config]
    if any(ref_files) and not all(ref_files):
        raise MpqError("MixDQ-file mode needs all of --sensitivity_ssim, --sensitivity_sqnr and --para_size_config")
    mixdq = (
        MixdqFiles(args.sensitivity_ssim, args.sensitivity_sqnr, args.para_size_config, args.act_protect)
        if all(ref_files)
        else None
    )
    req = SolveRequest(
        args.kind,
        mixdq,
        args.target_bitwidth,
        args.K,
        args.budget_mb,
        args.compare,
        args.out,
        Path(args.mixed_precision_config) if args.mixed_precision_config else None,
    )
    if not (mixdq or req.single or req.compare):  # the run's sweep: the search stage, its flags as config overrides
        if args.mode:
            args.overrides = [*args.overrides, f"search.mode={args.mode}"]
        if args.target_bitwidth is not None:
            if not args.kind:
                raise MpqError(
                    "--target_bitwidth for a run's sweep needs --kind weight|act (the two sweeps have their own "
                    "targets)"
                )
            args.overrides = [*args.overrides, f"search.{args.kind}.target_bitwidth={args.target_bitwidth}"]
        return run_stage_command(args)
    if mixdq:
        cfg = resolve_run(args)[0] if (args.config or args.run_dir) else build_config({}, list(args.overrides))
        run = None
    else:
        cfg, run = resolve_run(args)
    cfg.search.mode = args.mode or ("reference" if mixdq else cfg.search.mode)
    solve(cfg, run, req)
    return None


def _arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Modes: (1) --base_path RUN: the search stage, all plans into RUN/candidates; "
        "(2) MixDQ flags (--sensitivity_ssim/--sensitivity_sqnr/--para_size_config/--mixed_precision_config): "
        "programs on MixDQ files; (3) --K/--budget_mb: one plan; (4) --compare PLAN --out BEST: the optimal plan "
        "within PLAN's per-group average bits."
    )
    p.add_argument(
        "--mixed_precision_type",
        "--kind",
        dest="kind",
        choices=KINDS,
        default=None,
        help="weight or act (default: both in a run)",
    )
    p.add_argument(
        "--sensitivity_ssim", default=None, metavar="YAML", help="MixDQ SSIM sensitivity file (content layers)"
    )
    p.add_argument("--sensitivity_sqnr", default=None, metavar="YAML", help="MixDQ SQNR sensitivity file (all layers)")
    p.add_argument("--para_size_config", default=None, metavar="YAML", help="MixDQ tensor-size ratio file")
    p.add_argument("--mixed_precision_config", default=None, metavar="DIR", help="folder for the plan files")
    p.add_argument(
        "--target_bitwidth",
        type=float,
        default=None,
        help="average bits: the budget selection chooses at (search.sweep=full sweeps the whole range and includes "
        "it; with MixDQ's files or search.sweep=target the sweep goes from target - search.sweep_span to target)",
    )
    p.add_argument(
        "--act_protect",
        default=None,
        metavar="FILE",
        help="layers whose activations stay FP (MixDQ files mode); without it, an act search derives the list by "
        "MixDQ's rule "
        "(search.act_protect_percent per group at search.act_protect_bit) and writes act_protect.pt/.txt into "
        "--mixed_precision_config",
    )
    p.add_argument(
        "--mode",
        choices=("mpq", "reference"),
        default=None,
        help="mpq: one program, byte budget; reference: MixDQ's two programs",
    )
    p.add_argument("--K", type=float, default=None, help="solve one K (and one budget) instead of the sweep")
    p.add_argument(
        "--budget_mb", type=float, default=None, help="mpq mode: one budget in MiB (2^20 bytes) instead of the sweep"
    )
    p.add_argument("--compare", default=None, metavar="PLAN", help="a plan yaml to check against the optimum")
    p.add_argument("--out", default=None, metavar="YAML", help="with --compare: where to write the optimal plan")


def command(help_text: str) -> Command:
    return stage_command("search", help_text, handle, _arguments)
