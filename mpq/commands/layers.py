"""``mpq layers``: every quantizable layer of a config's denoiser, with its group and sizes."""

from __future__ import annotations

import argparse
import sys

from mpq.commands.options import add_config_args
from mpq.commands.registry import Command


def handle(args: argparse.Namespace) -> None:
    from mpq.layers import format_table, meta_layers
    from mpq.runner.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not args.meta:
        from mpq.models import load_pipeline

        load_pipeline(cfg)  # proves the weights are there; the table itself needs none
    sys.stdout.write(format_table(meta_layers(cfg), args.csv))
    if not args.csv:
        from mpq.models.loader import arch_family, load_arch

        family = arch_family(load_arch(cfg))
        why = (
            "groups.content"
            if cfg.groups.content is not None
            else f"the {family.name} default: {family.content_reason}"
        )
        print(f"denoiser: {family.denoiser_class}; content group from {why}")


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--meta",
        action="store_true",
        help="build the architecture on the meta device: no weights needed, works offline",
    )
    p.add_argument("--csv", action="store_true", help="CSV output")


COMMAND = Command(
    "layers",
    help="print every quantizable layer: name, kind, group, weight_numel, act_numel",
    description="Every Linear/Conv2d layer of the configured denoiser, in module order, with its group (content: "
    "matched by groups.content, scored by SSIM; quality: the rest, SQNR), its weight size and its input activation "
    "size for one sample at sampling.resolution. The names are the ones plan and sensitivity files use. --meta "
    "builds the architecture without weights (offline); without it the pipeline is loaded first.",
    add_arguments=_arguments,
    handler=handle,
)
