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


def cmd_generate(args: argparse.Namespace) -> None:
    from mpq.config import load_config
    from mpq.generate import generate, save_images
    from mpq.models import load_pipeline
    from mpq.shapes.judge import adherence

    overrides = list(args.overrides) + ([f"sampling.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    outdir = Path(args.outdir)
    seeds = [cfg.sampling.seed + i for i in range(len(args.prompt))]
    images = generate(load_pipeline(cfg), args.prompt, seeds, cfg, desc="generating")
    paths = save_images(images, outdir)
    print(f"{len(paths)} FP images in {outdir} ({paths[0].name} .. {paths[-1].name}; image i uses seed {cfg.sampling.seed} + i, "
          f"{cfg.sampling.steps} steps, {cfg.sampling.resolution} px)")
    if cfg.model.id.startswith("embedded:tiny-sdxl"):
        score = adherence(images, args.prompt)
        if score is not None:
            print(f"prompt adherence (shapes judge): {score['all']:.0%} of images right in every attribute; "
                  + ", ".join(f"{a} {score[a]:.0%}" for a in ("shape", "color", "size", "position", "background")))


def cmd_select(args: argparse.Namespace) -> None:
    from mpq.select import run_selection
    from mpq.stages import SELECT, run_stage

    cfg, run = resolve_run(args)
    result = run_stage(SELECT, cfg, run, lambda: run_selection(cfg, run), args.force)
    if result:
        for kind, r in result.items():
            print(f"{kind}: chose {r['plan_file']} (MSE {r['mse']:.6g}, SSIM {r['ssim']:.6f}, PSNR {r['psnr']:.2f} dB)")
    print(f"final plans: {run.root / 'selection' / 'final_weight.yaml'}, {run.root / 'selection' / 'final_act.yaml'}")


def cmd_final(args: argparse.Namespace) -> None:
    from mpq.infer import run_final
    from mpq.stages import FINAL, run_stage

    cfg, run = resolve_run(args)
    run_stage(FINAL, cfg, run, lambda: run_final(cfg, run), args.force)
    print(f"images with the final plans: {run.root / 'generated_images'}")


def cmd_report(args: argparse.Namespace) -> None:
    from mpq.report import build_report
    from mpq.stages import REPORT, run_stage

    cfg, run = resolve_run(args)
    run_stage(REPORT, cfg, run, lambda: build_report(cfg, run), args.force)
    print(f"report: {run.root / 'report' / 'index.html'}")


def cmd_run(args: argparse.Namespace) -> None:
    """calib -> ptq -> sensitivity -> search -> select -> final -> report, skipping what is up to date."""
    import json

    from mpq.infer import run_final
    from mpq.models import load_pipeline
    from mpq.report import adherence_line, build_report
    from mpq.search_run import run_search
    from mpq.select import run_selection
    from mpq.stages import FINAL, REPORT, SEARCH, SELECT, SENSITIVITY, run_stage

    cfg, run = resolve_run(args)
    pipe = load_pipeline(cfg)
    ensure_ptq(cfg, run, args.force, pipe)
    run_stage(SENSITIVITY, cfg, run, lambda: run_sensitivity_all(cfg, run, ("weight", "act"), ("sqnr", "ssim"), pipe=pipe), args.force)
    run_stage(SEARCH, cfg, run, lambda: run_search(cfg, run), args.force)
    run_stage(SELECT, cfg, run, lambda: run_selection(cfg, run, pipe), args.force)
    run_stage(FINAL, cfg, run, lambda: run_final(cfg, run, pipe), args.force)
    run_stage(REPORT, cfg, run, lambda: build_report(cfg, run, pipe), args.force)
    s = json.loads((run.root / "report" / "summary.json").read_text())
    print("\n".join([
        f"run directory: {run.root}",
        f"  final plans: {run.root / 'selection' / 'final_weight.yaml'}, {run.root / 'selection' / 'final_act.yaml'} "
        f"(+ {s['act_protected']} act-protected layers)",
        f"  images:      {run.root / 'generated_images'}  (FP references: {run.fp_images})",
        f"  checkpoint:  {run.ckpt}",
        f"  report:      {run.root / 'report' / 'index.html'}",
        f"  weights {s['weight_avg_bits']:.2f} avg bits, activations {s['act_avg_bits']:.2f} avg bits",
        f"  weight bytes {s['weight_bytes']:,.0f} vs FP16 {s['fp16_bytes']:,.0f} ({s['weight_bytes'] / s['fp16_bytes']:.1%})",
        f"  MSE vs FP images: {s['final_mse']:.6g}",
    ]))
    adh = adherence_line(s)
    if adh:
        print(f"  prompt adherence ({s['eval_prompts']['n']} prompts, {s['eval_prompts']['source']}): {adh}")


def cmd_train_tiny(args: argparse.Namespace) -> None:
    import torch

    from mpq.shapes.train import TrainConfig, train_tiny

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MpqError(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    info = train_tiny(args.outdir, TrainConfig(**fields))
    print(f"trained pipeline: {args.outdir} (load it with model.id={args.outdir})\n"
          f"  judge: {Path(args.outdir) / 'shapes-judge.safetensors'}\n  seconds per phase: {info['timings_s']}")


def run_sensitivity_all(cfg: Any, run: Any, kinds: Sequence[str], metrics: Sequence[str], method: str | None = None, pipe: Any = None) -> None:
    from mpq.ckpt import read_manifest
    from mpq.groups import assign_groups
    from mpq.sensitivity import compute_sensitivity, plot_sensitivity

    manifest = read_manifest(run.ckpt)
    groups = assign_groups([layer["name"] for layer in manifest["layers"]], list(cfg.groups.content), warn=False)
    for kind in kinds:
        for metric in metrics:
            values = compute_sensitivity(cfg, run, kind, metric, method, pipe)
            plot = plot_sensitivity(run, kind, metric, values, manifest["bits"], groups)
            print(f"[sensitivity] {kind} {metric}: {len(values)} layers -> {run.root / 'sensitivity' / f'{kind}_{metric}.yaml'} (plot {plot})")


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from mpq.stages import SENSITIVITY, run_stage

    cfg, run = resolve_run(args)
    kinds = [args.sensitivity_type] if args.sensitivity_type else ["weight", "act"]
    metrics = [args.metric] if args.metric else ["sqnr", "ssim"]
    if args.sensitivity_type or args.metric or args.method:
        run_sensitivity_all(cfg, run, kinds, metrics, args.method)
    else:
        run_stage(SENSITIVITY, cfg, run, lambda: run_sensitivity_all(cfg, run, kinds, metrics), args.force)


def cmd_search(args: argparse.Namespace) -> None:
    from mpq.config import build_config
    from mpq.plan import read_plan, write_plan
    from mpq.search import solve_compare
    from mpq.search_run import (compare_report, feasible_error, reference_problem, run_problem, run_search, run_sweep,
                                solve_point, sweep_grid, write_pareto_csv)
    from mpq.stages import SEARCH, run_stage

    ref_files = [args.sensitivity_ssim, args.sensitivity_sqnr, args.para_size_config]
    reference_flags = any(ref_files)
    if reference_flags and not all(ref_files):
        raise MpqError("MixDQ-file mode needs all of --sensitivity_ssim, --sensitivity_sqnr and --para_size_config")
    if reference_flags:
        cfg = resolve_run(args)[0] if (args.config or args.run_dir) else build_config({}, list(args.overrides))
        run = None
    else:
        cfg, run = resolve_run(args)
    if args.mode:
        cfg.search.mode = args.mode
    elif reference_flags:
        cfg.search.mode = "reference"
    kind = args.kind
    s = cfg.search

    def problem_for(k: str):
        if reference_flags:
            out = Path(args.mixed_precision_config) if args.mixed_precision_config else None
            return reference_problem(k, args.sensitivity_ssim, args.sensitivity_sqnr, args.para_size_config, cfg, args.act_protect, out)
        return run_problem(cfg, run, k)[0]

    if args.compare:
        if not args.out:
            raise MpqError("--compare PLAN needs --out BEST.yaml for the optimal plan")
        problem = problem_for(kind or "weight")
        given = read_plan(args.compare)
        best = solve_compare(problem, given, s.solver, s.time_limit_s)
        if not best.plan:
            raise MpqError(f"the solver found no plan ({best.status}) within the given plan's average bits")
        write_plan(args.out, best.plan)
        print(compare_report(problem, given, best))
        print(f"optimal plan: {args.out}")
        return

    single = args.K is not None or args.budget_mb is not None
    if reference_flags or single:
        kinds = [kind] if kind else (["weight"] if reference_flags else ["weight", "act"])
        for k in kinds:
            problem = problem_for(k)
            target = args.target_bitwidth if args.target_bitwidth is not None else s[k].target_bitwidth
            # in a run, single solves go beside the sweep folders: candidates/<kind>/ holds exactly the sweep's plans
            default_dir = (run.root / "candidates" / ("manual" if single else k)) if run else None
            outdir = Path(args.mixed_precision_config) if args.mixed_precision_config else default_dir
            if outdir is None:
                raise MpqError("give --mixed_precision_config DIR for the plan files")
            if single:
                kk = args.K if args.K is not None else 1.0
                budget = args.budget_mb * 2**20 if args.budget_mb is not None else None
                try:
                    sol = solve_point(problem, s.mode, target, kk, s, budget)
                except MpqError:
                    raise feasible_error(problem, s.mode, target, kk, s.band, budget) from None
                if not sol.plan:
                    raise feasible_error(problem, s.mode, target, kk, s.band, budget)
                path = outdir / f"{k}_{sol.details['avg_bits']:.2f}_{kk:.2f}.yaml"
                write_plan(path, sol.plan)
                d = sol.details
                print(f"{k} plan: {path}\n  avg bits {d['avg_bits']:.3f} (content {d.get('content_avg_bits', float('nan')):.3f}, "
                      f"quality {d.get('quality_avg_bits', float('nan')):.3f}), {d['bytes']:,.0f} bytes; solver {sol.status}, gap {sol.gap:.1e}, {sol.seconds:.2f} s")
            else:
                targets, ks = sweep_grid(s, k, target)
                rows = run_sweep(problem, k, s.mode, targets, ks, s, outdir)
                write_pareto_csv(outdir / "pareto.csv", rows)
                _print_sweep(rows, outdir)
        return

    def stage() -> list[dict[str, Any]]:
        return run_search(cfg, run, [kind] if kind else ("weight", "act"))

    rows = run_stage(SEARCH, cfg, run, stage, args.force)
    if rows is not None:
        _print_sweep(rows, run.root / "candidates")
    print(f"candidates: {run.root / 'candidates'}\nPareto plot: {run.root / 'report' / 'pareto.png'}")


def _print_sweep(rows: list[dict[str, Any]], outdir: Path) -> None:
    from collections import Counter

    for kind in ("weight", "act"):
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        status = Counter(r["status"] for r in rs)
        files = {r["plan_file"] for r in rs if r["plan_file"]}
        worst_gap = max((r["gap"] for r in rs if r["plan_file"]), default=0.0)
        print(f"{kind}: {len(rs)} (budget, K) points, {len(files)} distinct plans in {outdir}; "
              f"status {dict(status)}; largest gap {worst_gap:.1e}; Pareto-optimal: {sum(r['pareto'] for r in rs)}")
        if status.get("FEASIBLE"):
            print(f"  warning: {status['FEASIBLE']} solves hit search.time_limit_s and are not proven optimal (see the gap column)")


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

    p = sub.add_parser("generate", help="FP images for prompts with the config's default sampling: DIR/0000.png, DIR/0001.png, ...",
                       description="One full-precision image per --prompt, in prompt order; image i uses seed S + i. "
                       "For the embedded shapes model, the prompt adherence of the images is printed too.")
    add_config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: sampling.seed)")
    p.add_argument("--outdir", required=True, metavar="DIR", help="image folder")
    p.set_defaults(fn=cmd_generate)

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

    p = sub.add_parser("sensitivity", help="each layer quantized alone: SQNR (all layers) and SSIM (content group), W and A",
                       description="Without --sensitivity_type/--metric: all four files (skipped when up to date). "
                       "Partial results are saved as it goes; re-running resumes where a killed run stopped.")
    add_config_args(p, required=False)
    add_run_args(p, flag="--base_path")
    p.add_argument("--sensitivity_type", "--kind", dest="sensitivity_type", choices=("weight", "act"), default=None)
    p.add_argument("--metric", choices=("sqnr", "ssim"), default=None)
    p.add_argument("--method", choices=("fast", "naive"), default=None, help="fast (FP prefix cache, same numbers) or naive (default: sensitivity.method)")
    p.set_defaults(fn=cmd_sensitivity)

    p = sub.add_parser("search", help="integer program: candidate plans over budgets x K (run dir or MixDQ files)",
                       description="Modes: (1) --base_path RUN: the search stage, all plans into RUN/candidates; "
                       "(2) MixDQ flags (--sensitivity_ssim/--sensitivity_sqnr/--para_size_config/--mixed_precision_config): "
                       "reference programs on MixDQ files; (3) --compare PLAN --out BEST: the optimal plan within PLAN's per-group average bits.")
    add_config_args(p, required=False)
    add_run_args(p, flag="--base_path")
    p.add_argument("--mixed_precision_type", "--kind", dest="kind", choices=("weight", "act"), default=None, help="weight or act (default: both in a run)")
    p.add_argument("--sensitivity_ssim", default=None, metavar="YAML", help="MixDQ SSIM sensitivity file (content layers)")
    p.add_argument("--sensitivity_sqnr", default=None, metavar="YAML", help="MixDQ SQNR sensitivity file (all layers)")
    p.add_argument("--para_size_config", default=None, metavar="YAML", help="MixDQ tensor-size ratio file")
    p.add_argument("--mixed_precision_config", default=None, metavar="DIR", help="folder for the plan files")
    p.add_argument("--target_bitwidth", type=float, default=None, help="average bits; the sweep goes from target - search.sweep_span to target")
    p.add_argument("--act_protect", default=None, metavar="FILE",
                   help="layers whose activations stay FP (MixDQ files mode); without it, an act search derives the list by MixDQ's rule "
                   "(search.act_protect_percent per group at search.act_protect_bit) and writes act_protect.pt/.txt into --mixed_precision_config")
    p.add_argument("--mode", choices=("mpq", "reference"), default=None, help="mpq: one program, byte budget; reference: MixDQ's two programs")
    p.add_argument("--K", type=float, default=None, help="solve one K (and one budget) instead of the sweep")
    p.add_argument("--budget_mb", type=float, default=None, help="mpq mode: one budget in MiB (2^20 bytes) instead of the sweep")
    p.add_argument("--compare", default=None, metavar="PLAN", help="a plan yaml to check against the optimum")
    p.add_argument("--out", default=None, metavar="YAML", help="with --compare: where to write the optimal plan")
    p.set_defaults(fn=cmd_search)

    for name, fn, text in (("select", cmd_select, "score every candidate plan by image MSE vs FP; choose the weight plan, then the act plan"),
                           ("final", cmd_final, "generate RUN/generated_images with the selected plans"),
                           ("report", cmd_report, "RUN/report/index.html: images, plans, Pareto plot, sensitivity plots")):
        p = sub.add_parser(name, help=text)
        add_config_args(p, required=False)
        add_run_args(p, flag="--base_path")
        p.set_defaults(fn=fn)

    p = sub.add_parser("train-tiny", help="train the embedded shapes model (VAE, both text encoders, UNet) and its judge from scratch",
                       description="Seeded and resumable (state in OUTDIR/.train). Writes a diffusers folder (save_pretrained layout) "
                       "plus shapes-judge.safetensors and training.json. Defaults are the shipped model's settings.")
    p.add_argument("--outdir", required=True, metavar="DIR", help="output folder (a diffusers pipeline folder when done)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    from mpq.shapes.train import TrainConfig

    for name, f in TrainConfig.__dataclass_fields__.items():
        if name != "device":
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(f.default), default=None, metavar="N",
                           help=f"default {f.default}")
    p.set_defaults(fn=cmd_train_tiny)

    p = sub.add_parser("run", help="the whole flow: calib, ptq, sensitivity, search, select, final, report (up-to-date stages skipped)")
    add_config_args(p, required=False)
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
