"""``mpq train-tiny``: train an embedded shapes model (tiny-sdxl or tiny-sd3) from scratch, seeded and resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpq.commands.registry import Command
from mpq.errors import MpqError
from mpq.runner.outputs import check_output_folder


def handle(args: argparse.Namespace) -> None:
    import torch

    from mpq.shapes.train import TRAINING, TrainConfig, train_tiny

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MpqError(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_folder(args.outdir, "--outdir", TRAINING)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    info = train_tiny(args.outdir, TrainConfig(**fields))
    judge = Path(args.outdir) / "shapes-judge.safetensors"
    print(
        f"trained pipeline: {args.outdir} (load it with model.id={args.outdir})\n"
        + (f"  judge: {judge}\n" if judge.is_file() else "")
        + f"  seconds per phase: {info['timings_s']}"
    )


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outdir", required=True, metavar="DIR", help="output folder (a diffusers pipeline folder when done)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    from mpq.shapes.train import TrainConfig

    p.add_argument("--model", choices=("tiny-sdxl", "tiny-sd3"), default=None, help="which model (default tiny-sdxl)")
    p.add_argument(
        "--base", default=None, metavar="DIR", help="tiny-sd3: the tiny-sdxl folder to reuse (default: the shipped one)"
    )
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name not in ("device", "model", "base"):
            p.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                type=type(f.default),
                default=None,
                metavar="N",
                help=f"default {f.default}",
            )


COMMAND = Command(
    "train-tiny",
    help="train an embedded shapes model from scratch: tiny-sdxl (VAE, both text encoders, UNet, and the judge) "
    "or tiny-sd3 (its MMDiT, on tiny-sdxl's VAE and text encoders)",
    description="Seeded and resumable (state in OUTDIR/.train). Writes a diffusers folder (save_pretrained layout) "
    "and training.json (tiny-sdxl: plus shapes-judge.safetensors). Defaults are the shipped models' settings; "
    "--model tiny-sd3 reads the --mmdit-*, --caption-dropout, --pool-size and --base options.",
    add_arguments=_arguments,
    handler=handle,
)
