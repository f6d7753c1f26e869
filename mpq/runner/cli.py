"""The ``mpq`` command: one sub-command per stage, ``run`` for all of them, and tools."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed

from mpq.errors import MpqError
from mpq.layers import KINDS
from mpq.sensitivity import METRICS

DESCRIPTION = """Mixed-precision quantization search for diffusion models (MixDQ-compatible).

One sub-command per stage (calib, ptq, sensitivity, search, select, final,
report), `run` for all of them, and tools (layers, generate, infer, export, trace,
train-tiny). Every command takes --config NAME_OR_PATH (a name under configs/,
e.g. tiny-sdxl or sdxl-turbo.yaml, or a path) and key=value overrides (e.g.
quant.bits=[4,8] model.device=cpu). --outdir (alias --base_path) is always the
run directory (default outputs/<config name>); a stage command first runs the
stages it needs whose outputs are missing (`run` also re-makes stale ones).
`mpq COMMAND --help` explains each command."""

Handler = Callable[[argparse.Namespace], None]


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


# --------------------------------------------------------------------------- shared options
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


def resolve_run(args: argparse.Namespace) -> tuple[Any, Any]:
    """(config, RunDir) from --config / --outdir / --seed / overrides."""
    from mpq.runner import distributed
    from mpq.runner.config import load_config
    from mpq.runner.rundir import RunDir

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


# --------------------------------------------------------------------------- stage commands
def _select_summary(run: Any, result: Any) -> str:
    from mpq.runner.files import read_records
    from mpq.selection import BudgetBest

    lines = []
    for kind, r in result.items():
        lines.append(
            f"{kind}: chose {r.plan_file} (MSE {r.mse:.6g}, SSIM {r.ssim:.6f}, PSNR {r.psnr:.2f} dB; {r.bytes:,.0f} "
            "bytes)"
        )
        table = run.selection / f"{kind}_budgets.csv"
        for b in read_records(table, BudgetBest, "re-run `mpq select`")[1:] if table.is_file() else []:
            best = f"{b.plan_file} (MSE {b.mse:.6g}, {b.bytes:,.0f} bytes)" if b.plan_file else "no candidate fits"
            lines.append(f"  best at budget {b.budget} ({b.budget_bytes:,.0f} bytes): {best}")
    return "\n".join(lines)


def _search_summary(run: Any, result: Any) -> str:
    from mpq.search.oneoff import sweep_summary

    return sweep_summary(result, run.candidates)


SUMMARIES: dict[str, Callable[[Any, Any], str]] = {"select": _select_summary, "search": _search_summary}


def _describe(name: str, run: Any, result: Any) -> None:
    from mpq.runner.stages import STAGES

    if result and name in SUMMARIES:
        print(SUMMARIES[name](run, result))
    print(f"{name}: " + ", ".join(str(run / o) for o in STAGES[name].outputs))


def cmd_stage(args: argparse.Namespace) -> None:
    from mpq.runner.stages import Context, run_through

    cfg, run = resolve_run(args)
    _describe(args.stage, run, run_through(args.stage, Context(cfg, run), force=args.force, rebuild_stale=False))


def cmd_run(args: argparse.Namespace) -> None:
    """Every stage, skipping what is up to date; then the headline numbers."""
    from mpq.report.report import read_summary, summary_lines
    from mpq.runner.stages import Context, run_through

    cfg, run = resolve_run(args)
    run_through("report", Context(cfg, run), force=args.force)
    print("\n".join(summary_lines(run, read_summary(run))))


def cmd_sensitivity(args: argparse.Namespace) -> None:
    """The stage, or (with --sensitivity_type/--metric/--method) the named files only, outside the stamps."""
    if not (args.sensitivity_type or args.metric or args.method):
        return cmd_stage(args)
    from mpq.sensitivity.stage import run_sensitivity

    cfg, run = resolve_run(args)
    kinds = (args.sensitivity_type,) if args.sensitivity_type else KINDS
    metrics = (args.metric,) if args.metric else METRICS
    with run.lock("mpq sensitivity"):
        run_sensitivity(cfg, run, kinds, metrics, args.method, force=args.force)


def cmd_search(args: argparse.Namespace) -> None:
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
        return cmd_stage(args)
    if mixdq:
        cfg = resolve_run(args)[0] if (args.config or args.run_dir) else build_config({}, list(args.overrides))
        run = None
    else:
        cfg, run = resolve_run(args)
    cfg.search.mode = args.mode or ("reference" if mixdq else cfg.search.mode)
    solve(cfg, run, req)


# --------------------------------------------------------------------------- tools
def cmd_layers(args: argparse.Namespace) -> None:
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


def cmd_generate(args: argparse.Namespace) -> None:
    from mpq.images import generate, save_images
    from mpq.models import load_pipeline
    from mpq.models.loader import is_shipped
    from mpq.runner.config import load_config
    from mpq.shapes.judge import adherence

    overrides = list(args.overrides) + ([f"sampling.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    outdir = Path(args.outdir)
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


def cmd_infer(args: argparse.Namespace) -> None:
    from mpq.final import plan_from_options, run_infer

    cfg, run = resolve_run(args)
    outdir = Path(args.image_dir) if args.image_dir else run.infer_images
    if run.stage_owned(outdir):
        raise MpqError(f"--image-dir {outdir} is the run directory or a stage's output folder; give another folder")
    with run.lock("mpq infer"):
        plan = plan_from_options(cfg, run, plan_args(args))
        result = run_infer(cfg, run, plan, outdir, args.num_imgs or cfg.infer.num_images, prompts=args.prompt)
    msg = f"{len(result['images'])} images in {outdir}"
    if result["mse"] is not None:
        msg += f" (MSE vs FP images: {result['mse']:.6f})"
    print(msg)


def cmd_export(args: argparse.Namespace) -> None:
    from mpq.export.run import export_plan
    from mpq.final import plan_from_options

    cfg, run = resolve_run(args)
    with run.lock("mpq export", write=False):
        plan = plan_from_options(cfg, run, plan_args(args))
        info = export_plan(cfg, run, args.out, args.format, plan, args.fp_dtype, args.overwrite)
    if args.format == "mpq":
        print(
            f"exported to {info['out']}: {info['layers']} quantized layers, denoiser weights "
            f"{info['denoiser_bytes']:,} bytes on disk; "
            f"load it with `mpq.load_quantized('{info['out']}')`"
        )
    elif args.format == "torchao":
        print(
            f"torchao plan in {info['out']}/torchao_config.json ({info['layers']} layers; per layer kind: "
            f"{info['summary']}; "
            "details in torchao_layers.csv)"
        )
    else:
        print(
            f"encodings in {info['out']}/{info['file']} ({info['params']} weight and {info['activations']} activation "
            "encodings)"
        )


def cmd_trace(args: argparse.Namespace) -> int:
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
    from mpq.final import plan_from_options
    from mpq.models import DTYPES
    from mpq.plan import final_plan
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


def cmd_train_tiny(args: argparse.Namespace) -> None:
    import torch

    from mpq.shapes.train import TrainConfig, train_tiny

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MpqError(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    info = train_tiny(args.outdir, TrainConfig(**fields))
    judge = Path(args.outdir) / "shapes-judge.safetensors"
    print(
        f"trained pipeline: {args.outdir} (load it with model.id={args.outdir})\n"
        + (f"  judge: {judge}\n" if judge.is_file() else "")
        + f"  seconds per phase: {info['timings_s']}"
    )


# --------------------------------------------------------------------------- parser
def _stage_parser(
    sub: Any, name: str, help_text: str, fn: Handler = cmd_stage, description: str | None = None
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_text,
        description=description or help_text + ". Stages it needs that are not up to date run first.",
    )
    add_config_args(p, required=False)
    add_run_args(p)
    p.set_defaults(fn=fn, stage=name)
    if name in ("sensitivity", "select", "run"):
        p.add_argument(
            "--nproc",
            type=int,
            default=None,
            metavar="N",
            help="shard the work over N local processes (one per GPU when GPUs are visible, else CPU with gloo): "
            "the same as `torchrun --nproc_per_node N -m mpq ...`; the files are bit-identical to one process with as "
            "many "
            "threads as each rank",
        )
    return p


def _sensitivity_options(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Without --sensitivity_type/--metric/--method: the stage, all four files (skipped when up to date). "
        "With them: those files only. Partial results are saved as it goes; re-running resumes where a killed run "
        "stopped."
    )
    p.add_argument("--sensitivity_type", "--kind", dest="sensitivity_type", choices=KINDS, default=None)
    p.add_argument("--metric", choices=METRICS, default=None)
    p.add_argument(
        "--method",
        choices=("fast", "naive", "local", "fisher", "hybrid"),
        default=None,
        help="exact: fast (FP prefix cache, same numbers) or naive; estimates: local (each layer's own output SQNR), "
        "fisher (gradient-weighted error of the denoising loss) or hybrid (an estimate, exact where uncertain)",
    )


def _search_options(p: argparse.ArgumentParser) -> None:
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


STAGE_OPTIONS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None]]] = {
    "sensitivity": (cmd_sensitivity, _sensitivity_options),
    "search": (cmd_search, _search_options),
}


def build_parser() -> argparse.ArgumentParser:
    from mpq.runner.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="mpq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, stage in STAGES.items():
        fn, add_options = STAGE_OPTIONS.get(name, (cmd_stage, None))
        p = _stage_parser(sub, name, stage.help, fn)
        if add_options is not None:
            add_options(p)

    _stage_parser(
        sub,
        "run",
        "the whole flow: every stage (up-to-date ones skipped), then the headline numbers",
        cmd_run,
        description="calib, ptq, sensitivity, search, select, final, report; stages whose outputs are up to date are "
        "skipped "
        "and an interrupted stage resumes. --force re-runs the report.",
    ).set_defaults(stage="report")

    p = sub.add_parser(
        "layers",
        help="print every quantizable layer: name, kind, group, weight_numel, act_numel",
        description="Every Linear/Conv2d layer of the configured denoiser, in module order, with its group (content: "
        "matched by groups.content, scored by SSIM; quality: the rest, SQNR), its weight size and its input activation "
        "size for one sample at sampling.resolution. The names are the ones plan and sensitivity files use. --meta "
        "builds the architecture without weights (offline); without it the pipeline is loaded first.",
    )
    add_config_args(p)
    p.add_argument(
        "--meta",
        action="store_true",
        help="build the architecture on the meta device: no weights needed, works offline",
    )
    p.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser(
        "generate",
        help="FP images for prompts with the config's default sampling: DIR/0000.png, DIR/0001.png, ...",
        description="One full-precision image per --prompt, in prompt order; image i uses seed S + i. "
        "For the embedded shapes model, the prompt adherence of the images is printed too.",
    )
    add_config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: sampling.seed)")
    p.add_argument("--outdir", required=True, metavar="DIR", help="image folder")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "infer",
        help="generate images with uniform bits or MixDQ plan files (fake-quant)",
        description="Images from a run's pipeline with a plan applied (fake-quant): uniform --weight-bits/--act-bits, "
        "or MixDQ's plan files; with no plan option, infer.weight_bits / infer.act_bits of the config. Without "
        "--prompt the calibration prompts and seeds are used and the MSE against the FP images is printed.",
    )
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
    p.set_defaults(fn=cmd_infer, force=False)

    p = sub.add_parser(
        "export",
        help="write a plan (the selected one by default) as a smaller model: packed mpq folder, torchao config, or "
        "encodings",
        description="--format mpq: a diffusers pipeline folder whose denoiser stores 2/4/8-bit weights packed (four, "
        "two, one a byte) with fp32 scales, weight formats packed as they store (nf<k>: base-k codes at ~log2(k) bits "
        "with uint8 block ratios; fp8: e4m3 bytes), FP layers in --fp-dtype; load it with mpq.load_quantized(DIR), or "
        "after `import mpq` with diffusers' DiffusionPipeline.from_pretrained(DIR, torch_dtype=...). --format torchao: "
        "the plan as a torchao FqnToConfig (torchao_config.json) with what torchao could and could not take "
        "(torchao_layers.csv). "
        "--format encodings: AIMET-style encodings JSON for every quantized weight and activation.",
    )
    add_config_args(p, required=False)
    p.add_argument(
        "--base_path",
        "--base-path",
        dest="run_dir",
        required=True,
        metavar="RUN_DIR",
        help="run directory with ckpt.safetensors",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: new, empty, or an earlier export of the same format (replaced atomically); "
        "anything else needs --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even if it is not an mpq export (never a file or the run)",
    )
    p.add_argument("--format", choices=("mpq", "torchao", "encodings"), default="mpq", help="default: mpq")
    p.add_argument(
        "--fp-dtype",
        "--fp_dtype",
        dest="fp_dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="dtype of everything kept floating point (mpq format; fp32 makes images bit-identical to fake-quant)",
    )
    add_plan_args(p, " (or fp) instead of the selected plan")
    p.set_defaults(fn=cmd_export, seed=None)

    p = sub.add_parser(
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
    )
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
    p.set_defaults(fn=cmd_trace, force=False, seed=None)

    p = sub.add_parser(
        "train-tiny",
        help="train an embedded shapes model from scratch: tiny-sdxl (VAE, both text encoders, UNet, and the judge) "
        "or tiny-sd3 (its MMDiT, on tiny-sdxl's VAE and text encoders)",
        description="Seeded and resumable (state in OUTDIR/.train). Writes a diffusers folder (save_pretrained layout) "
        "and training.json (tiny-sdxl: plus shapes-judge.safetensors). Defaults are the shipped models' settings; "
        "--model tiny-sd3 reads the --mmdit-*, --caption-dropout, --pool-size and --base options.",
    )
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
    p.set_defaults(fn=cmd_train_tiny)
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
            from mpq.runner.launch import launch_local

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


if __name__ == "__main__":
    main_entry()
