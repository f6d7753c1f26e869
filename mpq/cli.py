"""The ``mpq`` command: one sub-command per stage, plus ``run`` for the whole flow.

Every sub-command takes ``--config NAME_OR_PATH`` (a name under configs/,
e.g. ``tiny-sdxl`` or ``sdxl-turbo.yaml``, or a path) and ``key=value``
overrides (e.g. ``quant.bits=[4,8] model.device=cpu``). Stages read and
write a run directory (default ``outputs/<config name>``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpq.errors import MpqError

Handler = Callable[[argparse.Namespace], None]


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


# --------------------------------------------------------------------------- shared options
def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="NAME_OR_PATH",
                   help="config name under configs/ (e.g. tiny-sdxl, sdxl-turbo.yaml) or a path to a .yaml file"
                   + ("" if required else "; default: the run directory's config.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. quant.bits=[4,8] model.device=cpu")


def add_run_args(p: argparse.ArgumentParser, flag: str = "--outdir") -> None:
    p.add_argument(flag, "--base_path" if flag == "--outdir" else "--outdir", dest="run_dir", metavar="RUN_DIR", default=None,
                   help="run directory (default: outputs/<config name>)")
    p.add_argument("--force", action="store_true", help="re-run stages even if their outputs are up to date")


def resolve_run(args: argparse.Namespace) -> tuple[Any, Any]:
    """(config, RunDir) from --config / --base_path / overrides."""
    from mpq.rundir import RunDir

    run_dir = getattr(args, "run_dir", None)
    if args.config is None:
        if run_dir is None:
            raise MpqError("give --config NAME_OR_PATH, or --base_path RUN_DIR of an existing run")
        run = RunDir(run_dir)
        return run.load_config(None, args.overrides), run
    run = RunDir(run_dir) if run_dir else None
    from mpq.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"sampling.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    return cfg, run or RunDir(Path("outputs") / cfg.name)


def _bits_arg(value: str) -> int | None:
    if value.lower() in ("fp", "none", "16", "32"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a bit-width (an integer, or fp)") from None


# --------------------------------------------------------------------------- commands
def cmd_layers(args: argparse.Namespace) -> None:
    from mpq.config import load_config
    from mpq.layer_table import format_table, layer_table

    cfg = load_config(args.config, args.overrides)
    if not args.meta:
        from mpq.models import load_pipeline

        load_pipeline(cfg)  # proves the weights are there; the table itself needs none
    sys.stdout.write(format_table(layer_table(cfg), args.csv))


def ensure_calib(cfg: Any, run: Any, force: bool = False, pipe: Any = None) -> Any:
    from mpq.calib import run_calibration
    from mpq.stages import CALIB, run_stage

    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    return run_stage(CALIB, cfg, run, lambda: run_calibration(cfg, run, pipe), force)


def ensure_ptq(cfg: Any, run: Any, force: bool = False, pipe: Any = None) -> Any:
    from mpq.ptq import run_ptq
    from mpq.stages import PTQ, run_stage

    ensure_calib(cfg, run, force=False, pipe=pipe)
    return run_stage(PTQ, cfg, run, lambda: run_ptq(cfg, run, pipe), force)


def cmd_calib(args: argparse.Namespace) -> None:
    cfg, run = resolve_run(args)
    ensure_calib(cfg, run, args.force)
    print(f"calibration data: {run.calib}\nFP images: {run.fp_images}")


def cmd_ptq(args: argparse.Namespace) -> None:
    cfg, run = resolve_run(args)
    ensure_ptq(cfg, run, args.force)
    print(f"checkpoint (all of {list(cfg.quant.bits)} bits, W and A): {run.ckpt}")


def cmd_infer(args: argparse.Namespace) -> None:
    from mpq.infer import run_infer

    cfg, run = resolve_run(args)
    outdir = Path(args.outdir_images) if args.outdir_images else run.root / "generated_images"
    plan_args = {
        "weight_bits": args.weight_bits,
        "act_bits": args.act_bits,
        "weight_plan": args.config_weight_mp,
        "act_plan": args.config_act_mp,
        "act_protect": args.act_protect,
    }
    n = args.num_imgs or cfg.infer.num_images
    result = run_infer(cfg, run, plan_args, outdir, n, prompts=args.prompt)
    msg = f"{len(result['images'])} images in {outdir}"
    if result["mse"] is not None:
        msg += f" (MSE vs FP images: {result['mse']:.6f})"
    print(msg)


def cmd_run(args: argparse.Namespace) -> None:
    from mpq.infer import run_infer
    from mpq.models import load_pipeline

    cfg, run = resolve_run(args)
    pipe = load_pipeline(cfg)
    ensure_ptq(cfg, run, args.force, pipe)
    lines = [f"run directory: {run.root}", f"  FP images:   {run.fp_images}", f"  checkpoint:  {run.ckpt}"]
    for w, a in ((8, 8), (4, 8)):
        if w in cfg.quant.bits and a in cfg.quant.bits:
            out = run.root / "generated_images" / f"w{w}a{a}"
            res = run_infer(cfg, run, {"weight_bits": w, "act_bits": a}, out, cfg.infer.num_images, pipe=pipe)
            lines.append(f"  W{w}A{a} images: {out}  (MSE vs FP: {res['mse']:.6f})")
    print("\n".join(lines))


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="print every quantizable layer: name, kind, group, weight_numel, act_numel")
    add_config_args(p)
    p.add_argument("--meta", action="store_true", help="build the architecture on the meta device: no weights needed, works offline")
    p.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser("calib", help="run the FP pipeline; record denoiser I/O per step and FP reference images")
    add_config_args(p)
    add_run_args(p)
    p.add_argument("--seed", type=int, default=None, help="base seed (image i uses seed + i)")
    p.set_defaults(fn=cmd_calib)

    p = sub.add_parser("ptq", help="calibrate W and A quant params for every candidate bit in one pass (runs calib first if needed)")
    add_config_args(p)
    add_run_args(p)
    p.add_argument("--seed", type=int, default=None, help="base seed (image i uses seed + i)")
    p.set_defaults(fn=cmd_ptq)

    p = sub.add_parser("infer", help="generate images with uniform bits or MixDQ plan files (fake-quant)")
    add_config_args(p, required=False)
    p.add_argument("--base_path", "--base-path", dest="run_dir", required=True, metavar="RUN_DIR", help="run directory with ckpt.safetensors")
    p.add_argument("--weight-bits", "--weight_bits", type=_bits_arg, default=None, help="uniform weight bits (or fp)")
    p.add_argument("--act-bits", "--act_bits", type=_bits_arg, default=None, help="uniform activation bits (or fp)")
    p.add_argument("--config_weight_mp", "--weight-plan", default=None, metavar="YAML", help="MixDQ weight plan (layer: bits)")
    p.add_argument("--config_act_mp", "--act-plan", default=None, metavar="YAML", help="MixDQ activation plan (layer: bits)")
    p.add_argument("--act_protect", "--act-protect", default=None, metavar="FILE", help="layers whose activations stay FP (torch.save list, yaml or txt)")
    p.add_argument("--num_imgs", "--num-images", type=int, default=None, help="number of images (default: infer.num_images)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable); default: the calibration prompts, so MSE vs FP is printed")
    p.add_argument("--outdir", dest="outdir_images", default=None, help="image folder (default: RUN_DIR/generated_images)")
    p.set_defaults(fn=cmd_infer, force=False)

    p = sub.add_parser("run", help="the whole flow on a config, skipping stages that are up to date")
    add_config_args(p)
    add_run_args(p)
    p.set_defaults(fn=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except MpqError as err:
        print(f"mpq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpq: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
        return 130
    return 0


def script_main(command: str, argv: Sequence[str] | None = None) -> None:
    """Entry for scripts/*.py: ``mpq <command>`` with the script's arguments."""
    sys.exit(main([command, *(sys.argv[1:] if argv is None else argv)]))


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
