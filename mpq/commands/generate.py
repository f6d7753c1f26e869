"""``mpq generate``: FP images for prompts with a config's default sampling."""

from __future__ import annotations

import argparse

from mpq.commands.options import add_config_args
from mpq.commands.registry import Command
from mpq.images import IMAGES
from mpq.runner.outputs import check_output_folder


def handle(args: argparse.Namespace) -> None:
    from mpq.images import generate, save_images
    from mpq.models import load_pipeline
    from mpq.models.loader import is_shipped
    from mpq.runner.config import load_config
    from mpq.shapes.judge import adherence

    overrides = list(args.overrides) + ([f"sampling.seed={args.seed}"] if args.seed is not None else [])
    outdir = check_output_folder(args.outdir, "--outdir", IMAGES)  # before the model loads
    cfg = load_config(args.config, overrides)
    seeds = [cfg.sampling.seed + i for i in range(len(args.prompt))]
    images = generate(load_pipeline(cfg), args.prompt, seeds, cfg, desc="generating")
    paths = save_images(images, outdir)
    print(
        f"{len(paths)} FP images in {outdir} ({paths[0].name} .. {paths[-1].name}; image i uses seed "
        f"{cfg.sampling.seed} + i, "
        f"{cfg.sampling.steps} steps, {cfg.sampling.resolution} px)"
    )
    if is_shipped(cfg.model.id):
        score = adherence(images, args.prompt)
        if score is not None:
            print(
                f"prompt adherence (shapes judge): {score['all']:.0%} of images right in every attribute; "
                + ", ".join(f"{a} {score[a]:.0%}" for a in ("shape", "color", "size", "position", "background"))
            )


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: sampling.seed)")
    p.add_argument("--outdir", required=True, metavar="DIR", help="image folder")


COMMAND = Command(
    "generate",
    help="FP images for prompts with the config's default sampling: DIR/0000.png, DIR/0001.png, ...",
    description="One full-precision image per --prompt, in prompt order; image i uses seed S + i. "
    "For the embedded shapes model, the prompt adherence of the images is printed too.",
    add_arguments=_arguments,
    handler=handle,
)
