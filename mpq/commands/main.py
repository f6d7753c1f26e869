"""The ``mpq`` command: the parser built from every command's registration, and ``main`` (errors as one line,
``--nproc`` jobs, torchrun ranks)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

import torch.distributed

from mpq.commands import export, generate, infer, layers, pipeline, search, sensitivity, trace, train_tiny
from mpq.commands.registry import Command
from mpq.errors import MpqError

DESCRIPTION = """Mixed-precision quantization search for diffusion models (MixDQ-compatible).

One sub-command per stage (calib, ptq, sensitivity, search, select, final,
report), `run` for all of them, and tools (layers, generate, infer, export, trace,
train-tiny). Every command takes --config NAME_OR_PATH (a name under configs/,
e.g. tiny-sdxl or sdxl-turbo.yaml, or a path) and key=value overrides (e.g.
quant.bits=[4,8] model.device=cpu). --outdir (alias --base_path) is always the
run directory (default outputs/<config name>); a stage command first runs the
stages it needs whose outputs are missing (`run` also re-makes stale ones).
`mpq COMMAND --help` explains each command."""


def _quiet_libraries() -> None:
    """The command's own output only: libraries' info logs and import-time noise (torchao, when installed, logs its
    unsupported CUDA extensions and pytree deprecations on import) are silenced here, in the application, never on
    ``import mpq``."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def commands() -> dict[str, Command]:
    """Every sub-command in ``mpq --help`` order: the stages (registry order), ``run``, then the tools."""
    from mpq.commands.stages import STAGES

    special = {"sensitivity": sensitivity.command, "search": search.command}
    stages = [special[n](s.help) if n in special else pipeline.stage_command(n, s.help) for n, s in STAGES.items()]
    tools = (layers, generate, infer, export, trace, train_tiny)
    return {c.name: c for c in (*stages, pipeline.RUN, *(m.COMMAND for m in tools))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in commands().values():
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help)
        c.add_arguments(p)
        p.set_defaults(fn=c.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mpq.runner import distributed

    _quiet_libraries()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    tag, status = "", 0
    try:
        if getattr(args, "nproc", None) is not None:
            check_nproc(args.nproc)
        if getattr(args, "nproc", None) and args.nproc > 1 and not distributed.launched():
            from mpq.commands.launch import launch_local

            return launch_local(args.nproc, _without_nproc(argv))
        d = distributed.init()
        tag = d.tag()
        if not d.is_main:  # rank 0 reports; the other ranks speak only to fail
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        status = args.fn(args)
    except MpqError as err:
        print(f"mpq: {tag}error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpq: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
        return 130
    except torch.distributed.DistError as err:  # a collective broke, a store or backend connection was lost
        if not distributed.current().enabled:
            raise
        # a collective broke because another rank of the job died: that rank is the cause, not this one
        print(f"mpq: {tag}stopped: another rank of the job died ({str(err).splitlines()[0][:120]})", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return status if isinstance(status, int) else 0


def check_nproc(n: int) -> None:
    """``--nproc``: at least 1; a warning above the GPUs (or, without GPUs, the CPU cores); refused above four times
    that, where ranks would only compete for the same devices and memory."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices, what = (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores")
    if n < 1:
        raise MpqError(f"--nproc {n}: give 1 or more processes")
    if n > 4 * devices:
        raise MpqError(f"--nproc {n} is far above the {devices} {what} here; use at most {devices}")
    if n > devices:
        print(f"mpq: warning: --nproc {n} is above the {devices} {what} here; ranks will share them", file=sys.stderr)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def script_main(command: str, argv: Sequence[str] | None = None) -> None:
    """Entry for scripts/*.py: ``mpq <command>`` with the script's arguments."""
    sys.exit(main([command, *(sys.argv[1:] if argv is None else argv)]))


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
