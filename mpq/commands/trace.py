"""``mpq trace``: where a plan or an export departs from FP, per component, step and layer; or two dumps compared."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mpq.commands.options import (
    add_base_path,
    add_config_args,
    add_plan_args,
    plan_args,
    plan_from_options,
    resolve_run,
)
from mpq.commands.registry import Command
from mpq.errors import MpqError


def handle(args: argparse.Namespace) -> int:
    """A precision trace of a plan or an export against FP, or (--compare) two dumps tensor by tensor."""
    if args.compare:
        from mpq.trace import compare_dumps

        a, b = args.compare
        result = compare_dumps(a, b, args.tol_cos, args.tol_sqnr)
        worst = sorted(result.rows, key=lambda r: r["sqnr_db"])[: args.top]
        print(f"{len(result.rows)} tensors of {a} compared with {b} (the reference); worst first:")
        for r in worst:
            print(
                f"  {r['name']:<48} SQNR {r['sqnr_db']:7.2f} dB  cos {r['cos']:.6f}  MAE {r['mae']:.3g}  "
                f"max {r['max_abs']:.3g}"
            )
        if result.first is None:
            print(f"PASS: every tensor within cos >= {args.tol_cos} and SQNR >= {args.tol_sqnr} dB")
            return 0
        f = result.first
        print(
            f"FAIL: first tensor past the tolerance: {f['name']} (SQNR {f['sqnr_db']:.2f} dB, cos {f['cos']:.6f}; "
            f"--tol-cos {args.tol_cos}, --tol-sqnr {args.tol_sqnr})"
        )
        return 1
    if args.run_dir is None:
        raise MpqError("give --base_path RUN_DIR (the run whose FP pipeline is the reference), or --compare A B")

    from mpq.plan import final_plan
    from mpq.runner.choices import DTYPES
    from mpq.trace import MODES, summary_lines, trace

    cfg, run = resolve_run(args)
    options = plan_args(args)
    if args.export and options is not None:
        raise MpqError("--export traces an exported folder as it is; drop the plan options, or drop --export")
    plan, label = None, "the selected plan"
    if not args.export:
        plan = plan_from_options(cfg, run, options)
        if plan is None:
            plan = final_plan(run)
        else:
            label = _plan_label(options)
    modes = MODES if args.mode == "both" else (args.mode.replace("-", "_"),)
    with run.lock("mpq trace", write=False):
        t = trace(
            cfg,
            run,
            plan,
            label,
            export=args.export,
            export_dtype=DTYPES[args.dtype],
            prompt=args.prompt,
            seed=args.trace_seed,
            modes=modes,
            layers=None if args.no_layers else args.layers,
            dump=args.dump,
            out=args.out,
        )
    print("\n".join(summary_lines(t, args.top)))
    print("files: " + ", ".join(t["files"]))
    return 0


def _plan_label(options: dict[str, Any]) -> str:
    if options.get("weight_plan") or options.get("act_plan"):
        return " + ".join(Path(str(options[k])).name for k in ("weight_plan", "act_plan") if options.get(k))
    w, a = options.get("weight_bits"), options.get("act_bits")
    return f"W{w or 'fp'}A{a or 'fp'}"


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=False)
    add_base_path(p, False, "run directory (its FP pipeline is the reference; plans need its ckpt.safetensors)")
    add_plan_args(p, " (or fp) instead of the selected plan")
    p.add_argument("--export", default=None, metavar="DIR", help="trace an `mpq export --format mpq` folder instead")
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="compute dtype of an --export (default fp32: an fp32 export then equals its fake-quant plan exactly)",
    )
    p.add_argument("--prompt", default=None, help="the prompt (default: the run's first calibration prompt)")
    p.add_argument(
        "--seed",
        dest="trace_seed",
        type=int,
        default=None,
        help="the image's seed (default: that calibration prompt's seed, or sampling.seed with --prompt)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where trace.json and the plots go (default RUN_DIR/trace)"
    )
    p.add_argument(
        "--mode", choices=("both", "end-to-end", "isolated"), default="both", help="which modes (default both)"
    )
    p.add_argument(
        "--layers",
        default="",
        metavar="REGEX",
        help="trace only the layers whose name matches (re.search); default every layer. End-to-end mode keeps "
        "every traced layer's FP output of every step in memory: narrow it on a full-size model",
    )
    p.add_argument("--no-layers", action="store_true", help="components only")
    p.add_argument("--dump", default=None, metavar="DIR", help="also write the quantized run's component tensors here")
    p.add_argument(
        "--compare", nargs=2, default=None, metavar=("DUMP_A", "DUMP_B"), help="compare two dumps (B the reference)"
    )
    p.add_argument("--tol-cos", type=float, default=0.999, help="--compare: smallest passing cosine (default 0.999)")
    p.add_argument("--tol-sqnr", type=float, default=30.0, help="--compare: smallest passing SQNR dB (default 30)")
    p.add_argument("--top", type=int, default=8, help="rows printed per table (default 8)")
    p.set_defaults(force=False, seed=None)


COMMAND = Command(
    "trace",
    help="precision trace: where a plan or an exported model departs from FP, per component, step and layer",
    description="Runs the run's FP pipeline and the quantized one (a plan in fake-quant: the selected plan unless "
    "plan options are given; or --export DIR, an `mpq export` folder) on identical inputs (same prompt path, seed, "
    "initial latents and per-step noise) and reports, per component (text encoders, the denoiser and the "
    "scheduler at every step, the VAE decode) and per quantized layer at every step: mean absolute error, cosine "
    "similarity, SQNR (dB) and max absolute error against FP. Modes: end-to-end (the quantized pipeline on its own "
    "outputs: how error accumulates) and isolated (each component and each step fed the FP inputs, each layer its "
    "FP input: its own contribution). Writes OUT/trace.json and plots (the report includes them after `mpq report "
    "--force`). --dump DIR writes the quantized run's component inputs/outputs as safetensors with a manifest, for "
    "other runtimes; --compare A B compares two dumps tensor by tensor (exit status 1 past the tolerance).",
    add_arguments=_arguments,
    handler=handle,
)
