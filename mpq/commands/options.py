"""Options several commands share: the config and its overrides, the run directory, and a plan given on the
command line (uniform bits or MixDQ's plan files), read into a :class:`~mpq.plan.BitPlan` checked against the run's
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.runner.rundir import RunDir

if TYPE_CHECKING:
    from mpq.plan import BitPlan


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=required,
        metavar="NAME_OR_PATH",
        help="config name under configs/ (e.g. tiny-sdxl, sdxl-turbo.yaml) or a path to a .yaml file"
        + ("" if required else "; default: the run directory's config.yaml"),
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. quant.bits=[4,8] model.device=cpu"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outdir",
        "--base_path",
        "--base-path",
        dest="run_dir",
        metavar="RUN_DIR",
        default=None,
        help="the run directory (default: outputs/<config name>)",
    )
    p.add_argument("--force", action="store_true", help="re-run this stage even if its outputs are up to date")
    p.add_argument("--seed", type=int, default=None, help="base seed, i.e. sampling.seed (image i uses seed + i)")


def resolve_run(args: argparse.Namespace) -> tuple[DictConfig, RunDir]:
    """(config, RunDir) from --config / --outdir / --seed / overrides."""
    from mpq.runner import distributed
    from mpq.runner.config import load_config

    run_dir = getattr(args, "run_dir", None)
    overrides = list(args.overrides) + (
        [f"sampling.seed={args.seed}"] if getattr(args, "seed", None) is not None else []
    )
    overrides += distributed.device_override(distributed.current())
    if args.config is None:
        if run_dir is None:
            raise MpqError("give --config NAME_OR_PATH, or --base_path RUN_DIR of an existing run")
        run = RunDir(run_dir)
        return run.load_config(None, overrides), run
    cfg = load_config(args.config, overrides)
    return cfg, RunDir(run_dir) if run_dir else RunDir(Path("outputs") / cfg.name)


def add_base_path(p: argparse.ArgumentParser, required: bool, help_text: str) -> None:
    """``--base_path`` (aliases ``--base-path``, ``--outdir``): the run directory of a tool command."""
    p.add_argument(
        "--base_path",
        "--base-path",
        "--outdir",
        dest="run_dir",
        required=required,
        default=None,
        metavar="RUN_DIR",
        help=help_text,
    )


PLAN_ARGS = ("weight_bits", "act_bits", "weight_plan", "act_plan", "act_protect")


def add_plan_args(p: argparse.ArgumentParser, uniform: str) -> None:
    """A plan on the command line (``infer``, ``export``): uniform bits, or MixDQ's plan files (its option names or
    mpq's)."""
    unset = argparse.SUPPRESS  # an option not given is absent: "--weight-bits fp" and no option at all differ
    p.add_argument(
        "--weight-bits",
        "--weight_bits",
        type=_weight_arg,
        default=unset,
        help=f"uniform weight bits or format (nf12, fp8, ...){uniform}",
    )
    p.add_argument("--act-bits", "--act_bits", type=_bits_arg, default=unset, help=f"uniform activation bits{uniform}")
    p.add_argument(
        "--config_weight_mp",
        "--weight-plan",
        dest="weight_plan",
        default=unset,
        metavar="YAML",
        help="MixDQ weight plan (layer: bits)",
    )
    p.add_argument(
        "--config_act_mp",
        "--act-plan",
        dest="act_plan",
        default=unset,
        metavar="YAML",
        help="MixDQ activation plan (layer: bits)",
    )
    p.add_argument(
        "--act_protect",
        "--act-protect",
        dest="act_protect",
        default=unset,
        metavar="FILE",
        help="layers whose activations stay FP (torch.save list, yaml or txt)",
    )


def plan_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """:func:`add_plan_args`' values, as :func:`mpq.plan.plan_from_args` takes them; None when no plan option was
    given."""
    if not any(hasattr(args, k) for k in PLAN_ARGS):
        return None
    return {k: getattr(args, k, None) for k in PLAN_ARGS}


def _bits_arg(value: str) -> int | None:
    if value.lower() in ("fp", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a bit-width (an integer, or fp for floating point)"
        ) from None


def _weight_arg(value: str) -> Any:
    """``--weight-bits``: bits, fp, or a weight format the checkpoint calibrated (nf12, fp8, ...)."""
    if value.lower() in ("fp", "none") or value.strip().isdigit():
        return _bits_arg(value)
    from mpq.quant.formats import weight_key

    try:
        return weight_key(value)
    except MpqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def plan_from_options(cfg: DictConfig, run: RunDir, options: dict[str, Any] | None) -> BitPlan | None:
    """The plan given on the command line (``mpq infer``, ``mpq export``: uniform bits or MixDQ files), validated
    against the run's checkpoint; ``None`` when no plan option is given (``options`` None)."""
    if options is None:
        return None
    from mpq.calibration.checkpoint import manifest_formats, read_manifest
    from mpq.plan import plan_from_args

    manifest = read_manifest(run.require(run.ckpt, f"run `mpq ptq --base_path {run.root}` first"))
    return plan_from_args(
        [e["name"] for e in manifest["layers"]],
        manifest["bits"],
        **options,
        protect_weights=cfg.search.protect_weights,
        formats=manifest_formats(manifest),
    )
