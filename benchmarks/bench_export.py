"""Real low-bit export, measured: bytes on disk, resident memory, CPU latency.

    python benchmarks/bench_export.py [--base_path outputs/tiny-sdxl] [--skip-sdxl] [--device cpu]
        [--sdxl-weight-plan weight_4.00.yaml --sdxl-act-protect act_sensitivie_a8_1%.pt]

1. Embedded model (a run directory; missing stages run first): the denoiser exported with ``mpq export``
   (FP parts FP16) at uniform W8, uniform W4 and the selected plan; file bytes vs the FP16 denoiser file,
   resident tensor bytes of the loaded denoiser, and one denoiser call (batch 1): FP32 vs fake-quant vs
   exported vs torchao.
2. Full-size SDXL UNet architecture (random weights, built without the hub): the same export at W8, W4
   and a MixDQ weight plan file (``--sdxl-weight-plan``), files written to disk and measured; then CPU
   latency of SDXL-size layers (real shapes at 64x64 latents): FP32 vs fake-quant vs packed vs torchao.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.export.folder import export_folder
from mpq.export.mpq_format import (
    denoiser_export,
    export_mpq,
    load_quantized,
    tensor_bytes,
)
from mpq.models import load_arch
from mpq.plan import BitPlan, read_layer_list, read_plan
from mpq.quant.model import PREFIX, QuantModel
from mpq.quant.quantizer import WeightQuant
from mpq.quant.structure import Structure
from mpq.runner.config import load_config
from mpq.runner.files import save_tensors

from _measure import measure
from _synthetic import random_denoiser, synthetic_calib


def best_of(fn: Any, repeats: int) -> float:
    fn()
    return min(measure(torch.device("cpu"), fn)[1] for _ in range(repeats))


def file_bytes(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> int:
    path = folder / f"{name}.safetensors"
    save_tensors(path, tensors, metadata={"format": "pt"})
    size = path.stat().st_size
    path.unlink()
    return size


# ----------------------------------------------------------------------------- embedded model
def tiny_tables(base_path: str | None, repeats: int) -> None:
    from mpq.calibration.checkpoint import quantized_pipeline
    from mpq.commands.stages import Context, run_through
    from mpq.export.torchao_format import apply_torchao, torchao_plan
    from mpq.plan import final_plan
    from mpq.runner.rundir import RunDir

    cfg = load_config("tiny-sdxl", ["model.device=cpu"])
    run = RunDir(base_path or Path("outputs") / cfg.name)
    if not (run.root / "selection" / "final_weight.yaml").is_file():
        run_through("select", Context(cfg, run), rebuild_stale=False)
    cfg = run.load_config(None, ["model.device=cpu"])
    pipe, qm, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
    plans = {
        "uniform W8 (A16)": BitPlan.uniform(qm.names, 8, None),
        "uniform W4 (A16)": BitPlan.uniform(qm.names, 4, None),
        "chosen plan": final_plan(run),
        "uniform W8A8": BitPlan.uniform(qm.names, 8, 8),
    }
    arch = load_arch(cfg)
    kwargs = next(iter(synthetic_calib(qm.denoiser, arch, cfg.sampling.resolution, 1).batches(1, torch.device("cpu"))))[
        0
    ]
    tmp = Path(tempfile.mkdtemp(prefix="mpq-bench-export-"))
    fp16_tensors = denoiser_export(qm, BitPlan(), torch.float16)[0]
    fp16_file = file_bytes(fp16_tensors, tmp, "fp16")
    fp16_resident = sum(t.numel() * t.element_size() for t in fp16_tensors.values())
    fp32_resident = 2 * fp16_resident  # the same tensors in fp32 (every FP16 tensor is floating point)
    print("\n### Embedded model (tiny-sdxl): exported denoiser, `mpq export` (FP parts FP16)\n")
    print(
        "| plan | denoiser file bytes | vs FP16 file | resident tensors (loaded fp16) | resident tensors (loaded fp32) "
        "|"
    )
    print("|---|---|---|---|---|")
    print(f"| FP16 | {fp16_file:,} | 1.00x | {fp16_resident:,} | {fp32_resident:,} (FP32) |")
    loaded: dict[str, Any] = {}
    for label, plan in plans.items():
        qm.set_fp()
        out = tmp / label.replace(" ", "_")
        with export_folder(out, "mpq", run.root) as folder:
            info = export_mpq(pipe, qm, plan, folder, cfg, torch.float16)
        den16 = load_quantized(out, torch.float16).unet
        loaded[label] = load_quantized(out, torch.float32).unet
        print(
            f"| {label} | {info['denoiser_bytes']:,} | {fp16_file / info['denoiser_bytes']:.2f}x smaller | "
            f"{tensor_bytes(den16):,} | "
            f"{tensor_bytes(loaded[label]):,} |"
        )

    print(
        f"\n### Embedded model: one denoiser call, batch 1, CPU ({torch.get_num_threads()} threads), best of "
        f"{repeats}\n"
    )
    print("| path | plan | ms | vs FP32 |\n|---|---|---|---|")
    with torch.no_grad():
        qm.set_fp()
        t_fp = best_of(lambda: qm(**kwargs, return_dict=False), repeats)
        print(f"| FP32 | - | {t_fp * 1e3:.1f} | 1.00x |")
        for label in ("chosen plan", "uniform W8A8"):
            qm.apply(plans[label])
            t = best_of(lambda: qm(**kwargs, return_dict=False), repeats)
            print(f"| fake-quant | {label} | {t * 1e3:.1f} | {t / t_fp:.2f}x |")
            den = loaded[label]
            t = best_of(lambda: den(**kwargs, return_dict=False), repeats)
            print(f"| exported (packed, unpack per call) | {label} | {t * 1e3:.1f} | {t / t_fp:.2f}x |")
        qm.set_fp()
        fqn, _ = torchao_plan(qm, plans["uniform W8A8"])
        pipe2, qm2, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
        del qm2
        den = pipe2.unet
        apply_torchao(den, fqn)
        t = best_of(lambda: den(**kwargs, return_dict=False), repeats)
        print(
            f"| torchao (int8 dynamic linear, int8 weight-only conv) | uniform W8A8 | {t * 1e3:.1f} | {t / t_fp:.2f}x |"
        )


# ----------------------------------------------------------------------------- SDXL size
SDXL_LAYERS = [  # (layer, input shape at 64x64 latents, batch 1)
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (1, 1024, 640)),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", (1, 1024, 640)),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", (1, 256, 5120)),
    ("down_blocks.0.resnets.0.conv1", (1, 320, 64, 64)),
    ("up_blocks.0.resnets.0.conv1", (1, 2560, 16, 16)),
]


def sdxl_tables(weight_plan: str | None, act_protect: str | None, repeats: int, sizes: bool = True) -> None:
    from mpq.export.mpq_format import layer_spec, packed_tensors
    from mpq.export.packed import PackedLayer

    cfg = load_config("sdxl-turbo", ["model.device=cpu"])
    arch = load_arch(cfg)
    t0 = time.perf_counter()
    den = random_denoiser(arch, torch.float16, "cpu")
    qm = QuantModel(den)
    bos = [n for n in qm.names if n.endswith(("attn2.to_k", "attn2.to_v"))]
    qm.prepare([2, 4, 8], False, Structure(bos=bos), WeightQuant.from_config(cfg.quant.weight))
    for layer in qm.layers.values():
        layer.calibrate_weight()
    build = time.perf_counter() - t0
    plans = {"uniform W8": BitPlan.uniform(qm.names, 8, None), "uniform W4": BitPlan.uniform(qm.names, 4, None)}
    if weight_plan:
        plans[f"MixDQ {Path(weight_plan).name}"] = BitPlan(read_plan(weight_plan))
        if act_protect:
            plans[f"MixDQ {Path(weight_plan).name}, act-protected weights FP16"] = BitPlan(
                read_plan(weight_plan)
            ).protect(read_layer_list(act_protect), True)
    bos_rows = {n: torch.randn(qm.layers[n].weight.shape[1]) for n in bos}
    tmp = Path(tempfile.mkdtemp(prefix="mpq-bench-export-sdxl-"))
    if not sizes:
        plans = {}
    fp16 = 0 if not sizes else file_bytes(denoiser_export(qm, BitPlan(), torch.float16)[0], tmp, "fp16")
    n_params = sum(q.weight.numel() for q in qm.layers.values())
    if sizes:
        print(
            f"\n### Full-size SDXL UNet architecture (random weights; {len(qm.names)} layers, {n_params / 1e9:.3f} B "
            "quantizable "
            f"weights; built + weight scales in {build:.0f} s)\n"
        )
        print(
            "| plan | avg W bits | denoiser file on disk | FP16 / exported | resident when loaded (fp16) "
            "|\n|---|---|---|---|---|"
        )
        print(f"| FP16 | 16 | {fp16:,} | 1.00x | {fp16:,} |")
    for label, plan in plans.items():
        tensors, _ = denoiser_export(qm, plan, torch.float16, bos_rows)
        size = file_bytes(tensors, tmp, "x")
        resident = sum(t.numel() * t.element_size() for t in tensors.values())
        avg = sum(plan.weight.get(n, 16) * q.weight.numel() for n, q in qm.layers.items()) / n_params
        print(f"| {label} | {avg:.3f} | {size:,} | {fp16 / size:.2f}x | {resident:,} |", flush=True)
        del tensors
        gc.collect()

    print(
        f"\n### SDXL-size layers: one call, batch 1, CPU ({torch.get_num_threads()} threads), best of {repeats}; ms\n"
    )
    print(
        "| layer | input | FP32 | fake-quant W4A8 | packed W4A8 | packed W8A8 | torchao int8 dyn W8A8 | torchao int4 "
        "weight-only |"
    )
    print("|---|---|---|---|---|---|---|---|")
    from torchao.quantization import (
        FqnToConfig,
        Int8DynamicActivationInt8WeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis

    g = torch.Generator().manual_seed(0)
    for path, shape in SDXL_LAYERS:
        layer = qm.layers[PREFIX + path]
        layer.float()
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            layer.set_bits(None, None)
            layer.observing = True
            layer(x)
            layer.observing = False
            layer.finalize_act()
            t_fp = best_of(lambda: layer(x), repeats)
            layer.set_bits(4, 8)
            t_fq = best_of(lambda: layer(x), repeats)
            layer.set_bits(None, None)
            times = []
            for w in (4, 8):
                spec = layer_spec(layer, w, 8, False)
                packed = PackedLayer(spec)
                packed.load_state_dict(packed_tensors(layer, spec, torch.float32), strict=True)
                times.append(best_of(lambda: packed(x), repeats))
            tao = []
            for config in (
                Int8DynamicActivationInt8WeightConfig(),
                IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0)),
            ):
                plain = nn.Sequential(nn.Linear(1, 1) if isinstance(layer, nn.Linear) else nn.Conv2d(1, 1, 1))
                plain[0] = (
                    nn.Linear(layer.in_features, layer.out_features)
                    if isinstance(layer, nn.Linear)
                    else nn.Conv2d(
                        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding
                    )
                )
                plain[0].weight.data.copy_(layer.weight.data)
                try:
                    quantize_(plain, FqnToConfig({"0": config}), filter_fn=None)  # by name: Conv2d too, not only Linear
                    tao.append(f"{best_of(lambda: plain(x), repeats) * 1e3:.1f}")
                except (NotImplementedError, RuntimeError) as err:  # report what torchao cannot run
                    tao.append(f"n/a ({type(err).__name__}: no {type(layer).__name__.removeprefix('Quant')} kernel)")
        print(
            f"| {path} | {list(shape)} | {t_fp * 1e3:.1f} | {t_fq * 1e3:.1f} | {times[0] * 1e3:.1f} | "
            f"{times[1] * 1e3:.1f} | {tao[0]} | {tao[1]} |",
            flush=True,
        )
        layer.half()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base_path",
        default=None,
        help="tiny-sdxl run directory (default outputs/tiny-sdxl; missing stages run first)",
    )
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument(
        "--sdxl-weight-plan", default=None, metavar="YAML", help="a MixDQ SDXL weight plan (e.g. weight_4.00.yaml)"
    )
    ap.add_argument(
        "--sdxl-act-protect",
        default=None,
        metavar="FILE",
        help="its act-protect list (adds a row with those weights FP16)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdxl-latency-only", action="store_true", help="SDXL: only the layer latency table")
    args = ap.parse_args()
    if not args.skip_tiny:
        tiny_tables(args.base_path, args.repeats)
    if not args.skip_sdxl:
        sdxl_tables(args.sdxl_weight_plan, args.sdxl_act_protect, max(2, args.repeats // 2), not args.sdxl_latency_only)


if __name__ == "__main__":
    main()
