"""``mpq infer``: images from a run's pipeline with a plan applied (fake-quant), and their MSE against FP."""

from __future__ import annotations

import argparse

from mpq.commands.options import (
    add_base_path,
    add_config_args,
    add_plan_args,
    plan_args,
    plan_from_options,
    resolve_run,
)
from mpq.commands.registry import Command
from mpq.images import IMAGES
from mpq.runner.outputs import check_output_folder


def handle(args: argparse.Namespace) -> None:
    from mpq.final import run_infer

    cfg, run = resolve_run(args)
    outdir = check_output_folder(
        args.image_dir or run.infer_images, "--image-dir", IMAGES, run.root, own_folder=run.infer_images
    )
    # images outside the run write nothing into it: a read-only run still infers
    with run.lock("mpq infer", write=outdir.is_relative_to(run.root.resolve())):
        plan = plan_from_options(cfg, run, plan_args(args))
        result = run_infer(cfg, run, plan, outdir, args.num_imgs or cfg.infer.num_images, prompts=args.prompt)
    msg = f"{len(result['images'])} images in {outdir}"
    if result["mse"] is not None:
        msg += f" (MSE vs FP images: {result['mse']:.6f})"
    print(msg)


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=False)
    add_base_path(p, True, "run directory with ckpt.safetensors")
    add_plan_args(p, " (or fp)")
    p.add_argument(
        "--num_imgs", "--num-images", type=int, default=None, help="number of images (default: infer.num_images)"
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeatable); default: the calibration prompts, so MSE vs FP is printed",
    )
    p.add_argument(
        "--image_folder",
        "--image-dir",
        dest="image_dir",
        default=None,
        metavar="DIR",
        help="image folder (default: RUN_DIR/infer_images; never a stage's output folder)",
    )
    p.set_defaults(force=False)


COMMAND = Command(
    "infer",
    help="generate images with uniform bits or MixDQ plan files (fake-quant)",
    description="Images from a run's pipeline with a plan applied (fake-quant): uniform --weight-bits/--act-bits, "
    "or MixDQ's plan files; with no plan option, infer.weight_bits / infer.act_bits of the config. Without "
    "--prompt the calibration prompts and seeds are used and the MSE against the FP images is printed.",
    add_arguments=_arguments,
    handler=handle,
)
