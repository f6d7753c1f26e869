"""``mpq export``: a plan written as a smaller model (packed mpq folder), a torchao config, or encodings."""

from __future__ import annotations

import argparse

from mpq.commands.options import add_config_args, add_plan_args, plan_args, plan_from_options, resolve_run
from mpq.commands.registry import Command


def handle(args: argparse.Namespace) -> None:
    from mpq.export.run import export_plan

    cfg, run = resolve_run(args)
    fmt = args.format or cfg.target  # a run for SDNQ exports SDNQ's pipeline by default
    with run.lock("mpq export", write=False):
        plan = plan_from_options(cfg, run, plan_args(args))
        info = export_plan(cfg, run, args.out, fmt, plan, args.fp_dtype, args.overwrite)
    if fmt == "mpq":
        print(
            f"exported to {info['out']}: {info['layers']} quantized layers, denoiser weights "
            f"{info['denoiser_bytes']:,} bytes on disk; "
            f"load it with `mpq.load_quantized('{info['out']}')`"
        )
        if info["absent"]:  # e.g. SD3 without T5: diffusers' pipeline class requires them named
            absent = ", ".join(f"{name}=None" for name in info["absent"])
            print(
                f"  the pipeline was saved without {', '.join(info['absent'])}: after `import mpq`, diffusers loads "
                f"it with DiffusionPipeline.from_pretrained('{info['out']}', {absent})"
            )
    elif fmt == "sdnq":
        print(
            f"SDNQ pipeline in {info['out']}: {info['layers']} layers quantized by SDNQ as planned, their tensors "
            f"{info['layer_bytes']:,} bytes ({info['priced_bytes']:,.0f} priced by the search); {info['component']} "
            f"files {info['denoiser_bytes']:,} bytes; load it without mpq (pip install sdnq) with "
            f"DiffusionPipeline.from_pretrained('{info['out']}'"
            + "".join(f", {name}=None" for name in info["absent"])
            + ")"
        )
        if info["kept_fp"]:
            print(
                f"  {len(info['kept_fp'])} planned layers stay FP, as simulated and priced: SDNQ cannot pack their "
                f"dtype at their shape (first: {info['kept_fp'][0]})"
            )
        if info["act_dropped"]:
            print(
                f"  the plan's activation bits ({info['act_dropped']} layers) are not exported: SDNQ computes "
                "activations in the compute dtype"
            )
    elif fmt == "gguf":
        _print_gguf(info)
    elif fmt == "torchao":
        print(
            f"torchao plan in {info['out']}/torchao_config.json ({info['layers']} layers; per layer kind: "
            f"{info['summary']}; "
            "details in torchao_layers.csv)"
        )
    else:
        print(
            f"encodings in {info['out']}/{info['file']} ({info['params']} weight and {info['activations']} activation "
            "encodings)"
            + (
                f"; activation_encodings hold the all-steps ranges, the {info['step_groups']} step groups' ranges "
                "are in its mpq.step_groups section (AIMET has one encoding a tensor)"
                if info["step_groups"] > 1
                else ""
            )
        )


def _print_gguf(info: dict) -> None:
    out, comp, file = info["out"], info["component"], info["file"]
    print(
        f"GGUF denoiser {out}/{file} ({info['file_bytes']:,} bytes): {info['layers']} layers in their planned types, "
        f"the planned layers' weights {info['planned_bytes']:,} bytes ({info['priced_bytes']:,.0f} priced by the "
        f"search); original {info['family']} layout ({info['verified']})"
    )
    sdcpp = (  # sd.cpp prefixes a --diffusion-model's names; the ldm UNet's carry the prefix (diffusers needs it)
        "-m with the file's tensors in one checkpoint with the text encoders and VAE"
        if info["family"] == "unet"
        else f"--diffusion-model {out}/{file}"
    )
    print(
        f"  ComfyUI: copy it to models/unet and load it with the Unet Loader (GGUF); stable-diffusion.cpp: {sdcpp}; "
        f'the same types from the original checkpoint: --tensor-type-rules "$(cat {out}/tensor_type_rules.txt)"'
    )
    absent = "".join(f", {name}=None" for name in info["absent"])
    if info["not_in_diffusers"]:
        print(f"  diffusers cannot load it: its GGUF loader does not read {', '.join(info['not_in_diffusers'])}")
    else:
        print(
            f"  diffusers (no mpq): {comp} = {info['cls']}.from_single_file('{out}/{file}', config='{out}', "
            f"subfolder='{comp}', quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float16)); "
            f"DiffusionPipeline.from_pretrained('{out}', {comp}={comp}{absent})"
        )
    if info["kept_fp"]:
        print(
            f"  {len(info['kept_fp'])} planned layers stay floating point, as simulated and priced: their rows are "
            f"not whole blocks, or they are convolutions (first: {info['kept_fp'][0]})"
        )
    if info["act_dropped"]:
        print(f"  the plan's activation bits ({info['act_dropped']} layers) are not exported: GGUF stores weights")


def _arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--format",
        choices=("mpq", "torchao", "encodings", "sdnq", "gguf"),
        default=None,
        help="default: the run's target (mpq, or sdnq for a `target: sdnq` run); sdnq: an SDNQ pre-quantized "
        "pipeline (plans of sdnq-<dtype> candidates) that stock diffusers loads with the sdnq package, no mpq; "
        "gguf: the denoiser as one .gguf file in the original checkpoint layout (plans of gguf-<type> candidates) "
        "for ComfyUI-GGUF, stable-diffusion.cpp and diffusers' from_single_file",
    )
    p.add_argument(
        "--fp-dtype",
        "--fp_dtype",
        dest="fp_dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="dtype of everything kept floating point (mpq format; fp32 makes images bit-identical to fake-quant)",
    )
    add_plan_args(p, " (or fp) instead of the selected plan")
    p.set_defaults(seed=None)


COMMAND = Command(
    "export",
    help="write a plan (the selected one by default) as a smaller model: packed mpq folder, torchao config, or "
    "encodings",
    description="--format mpq: a diffusers pipeline folder whose denoiser stores 2/4/8-bit weights packed (four, "
    "two, one a byte) with fp32 scales, weight formats packed as they store (nf<k>: base-k codes at ~log2(k) bits "
    "with uint8 block ratios; fp8: e4m3 bytes), FP layers in --fp-dtype; load it with mpq.load_quantized(DIR), or "
    "after `import mpq` with diffusers' DiffusionPipeline.from_pretrained(DIR, torch_dtype=...). --format torchao: "
    "the plan as a torchao FqnToConfig (torchao_config.json) with what torchao could and could not take "
    "(torchao_layers.csv). "
    "--format encodings: AIMET-style encodings JSON for every quantized weight and activation. "
    "--format sdnq: a plan of SDNQ dtypes (quant.weight_formats=[sdnq-...]) quantized by SDNQ itself and saved as "
    "SDNQ saves pre-quantized models: DiffusionPipeline.from_pretrained(DIR) loads it with sdnq installed, no mpq. "
    "--format gguf: a plan of ggml types (target: gguf) as one .gguf denoiser in the original layout (UNet, SD3, "
    "Flux), the rest of the pipeline beside it, and stable-diffusion.cpp's --tensor-type-rules for the same plan.",
    add_arguments=_arguments,
    handler=handle,
)
