"""A full-size SDXL GGUF file written by mpq, loaded and run by stable-diffusion.cpp, against its own F16 file.

    pip install -e ".[runtimes]"          # stable-diffusion-cpp-python: a source build (CMake, ~15 min on 2 cores)
    python benchmarks/bench_gguf_sdcpp.py --out sdcpp_out

SDXL's architecture at full size with random weights (no hub here): the UNet (2.6 B parameters), CLIP-L and
CLIP-G text encoders and the VAE, each built by diffusers/transformers from SDXL's published configs. mpq writes
two UNet files in the original layout with :mod:`mpq.export.gguf_format`: F16 (every weight of two or more
dimensions) and a mixed plan (the hand rule "Q4_0, first/last blocks and in/out layers two types higher": Q4_0,
Q5_0 and F16 convolutions). stable-diffusion.cpp (its own GGUF reader and ggml kernels; no mpq in that process)
loads each, its tensors as written, with the text encoders and VAE in one checkpoint (see :func:`combined`), and
draws the same prompt and seed at a small resolution: the mixed file's image against the F16 file's (MSE and max
abs, [0, 1]), and the seconds of one sampling step, measured side by side in one process (a 1-step and a 3-step
generation; their difference / 2). CPU times here, never a GPU projection. Writes ``sdcpp.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf_plans import hand_rule  # noqa: E402

from mpq.export.gguf_format import tensor_types, write_gguf  # noqa: E402
from mpq.export.gguf_layout import layout  # noqa: E402
from mpq.quant.formats import resolve  # noqa: E402
from mpq.quant.structure import PREFIX, quantizable_modules  # noqa: E402

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)  # fmt: skip

_RUN = """
import json, sys, time
import numpy as np
from stable_diffusion_cpp import StableDiffusion
files, side, threads = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {}
for label, model in files["models"].items():
    sd = StableDiffusion(model_path=model, n_threads=threads, verbose=bool(files.get("verbose")))
    times = {}
    for steps in (1, 3):
        t = time.perf_counter()
        (img,) = sd.generate_image("a red circle", width=side, height=side, sample_steps=steps, seed=7, cfg_scale=1.0)
        times[steps] = time.perf_counter() - t
        if steps == 1:
            np.save(files["images"][label], np.asarray(img, dtype=np.float32) / 255.0)
    out[label] = {"generate_1_step_s": times[1], "step_s": (times[3] - times[1]) / 2}
    del sd
assert "mpq" not in sys.modules
print(json.dumps(out))
"""


def save_half(module: torch.nn.Module, path: Path, text: bool = False) -> None:
    """fp16 safetensors; ``text``: in Hugging Face CLIP's published names (``text_model.``, ``text_projection``),
    whichever way this transformers version nests them."""
    from safetensors.torch import save_file

    def name(k: str) -> str:
        return k if not text or k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"

    save_file({name(k): v.detach().half().contiguous() for k, v in module.state_dict().items()}, str(path))


def build_components(out: Path) -> dict[str, str]:
    """Random full-size CLIP-L, CLIP-G and VAE files (fp16 safetensors, the layouts their publishers use)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    files = {"clip_l": out / "clip_l.safetensors", "clip_g": out / "clip_g.safetensors", "vae": out / "vae.safetensors"}
    if not files["clip_l"].is_file():
        save_half(CLIPTextModel(CLIPTextConfig(**CLIP_L)), files["clip_l"], text=True)
    if not files["clip_g"].is_file():
        save_half(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), files["clip_g"], text=True)
    if not files["vae"].is_file():
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
        )
        save_half(vae, files["vae"])
    return {k: str(v) for k, v in files.items()}


MIXED = "mixed (Q4_0, edges Q5_0)"


def rules_check(out: Path, f16: Path, mixed: Path) -> dict[str, object]:
    """stable-diffusion.cpp's own converter, given the F16 file and the mixed file's ``--tensor-type-rules`` (as
    ``mpq export`` writes them): which tensors come out in the mixed file's types, and which it keeps (its
    converter never converts biases, embeddings and the time/label embeddings, whatever the rules)."""
    import gguf
    import stable_diffusion_cpp as sdcpp

    from mpq.export.gguf_format import tensor_type_rules

    mine = {t.name: t for t in gguf.GGUFReader(str(mixed)).tensors}
    rules = tensor_type_rules({n: t.tensor_type.name.lower() for n, t in mine.items()},
                              {n for n, t in mine.items() if len(t.shape) >= 2})  # fmt: skip
    path = out / "unet_by_sdcpp_rules.gguf"
    t = time.perf_counter()
    if not sdcpp.convert(str(f16).encode(), b"", str(path).encode(), 1, rules.encode(), False):  # 1: F16 default
        raise SystemExit("stable-diffusion.cpp's convert failed")
    seconds = time.perf_counter() - t
    theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    differ = sorted(n for n in mine if theirs[n].tensor_type != mine[n].tensor_type)
    return {
        "tensors": len(mine),
        "same_type": len(mine) - len(differ),
        "kept_by_sdcpp": {n: [mine[n].tensor_type.name, theirs[n].tensor_type.name] for n in differ},
        "convert_s": seconds,
    }


def combined(unet: Path, parts: dict[str, str], out: Path) -> Path:
    """One checkpoint for stable-diffusion.cpp's ``-m``: mpq's UNet tensors exactly as its file holds them (same
    names, types and bytes) and the text encoders and VAE under the names stable-diffusion.cpp maps for SDXL
    (``cond_stage_model.transformer.``, ``cond_stage_model.1.transformer.``, ``vae.``). stable-diffusion.cpp tells
    SDXL from SD1 by the second text encoder, which a UNet-only file lacks, so a UNet file alone is not enough."""
    import gguf
    from safetensors.torch import load_file

    path = out / f"sdxl_{unet.stem}.gguf"
    if path.is_file():
        return path
    writer = gguf.GGUFWriter(str(path), "sdxl", use_temp_file=True)
    for t in gguf.GGUFReader(str(unet)).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            writer.add_tensor(t.name, np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    prefixes = {"clip_l": "cond_stage_model.transformer.", "clip_g": "cond_stage_model.1.transformer.", "vae": "vae."}
    for part, prefix in prefixes.items():
        for name, tensor in load_file(parts[part]).items():
            writer.add_tensor(prefix + name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_unets(out: Path) -> tuple[dict[str, str], dict[str, object]]:
    """The F16 and the mixed file of a random full-size SDXL UNet (mpq's writer and layout)."""
    from mpq.models.loader import load_arch, meta_denoiser
    from mpq.runner.config import load_config

    arch = load_arch(load_config("sdxl-base-random"))
    config = {k: v for k, v in arch["denoiser"].items() if not k.startswith("_")}
    import diffusers

    torch.manual_seed(0)
    t = time.perf_counter()
    den = diffusers.UNet2DConditionModel.from_config(config).eval()
    params = {k: v.detach() for k, v in den.state_dict().items()}
    originals = layout("unet", list(params), den.config)
    names = list(quantizable_modules(meta_denoiser(arch)))
    plan = {n[len(PREFIX) :]: resolve(k) for n, k in hand_rule(names, "gguf-q4_0", 2).items()}
    files, info = {}, {}
    for label, layers in (("F16", {}), (MIXED, plan)):
        types = tensor_types(originals, params, layers, "f16")
        path = out / ("unet_f16.gguf" if not layers else "unet_mixed.gguf")
        if not path.is_file():
            write_gguf(path, originals, params, types, {"general.name": f"random SDXL UNet, {label}"}, "sdxl")
        files[label] = str(path)
        counts: dict[str, int] = {}
        for v in types.values():
            counts[v] = counts.get(v, 0) + 1
        info[label] = {"bytes": path.stat().st_size, "tensor_types": counts}
    print(f"wrote the UNet files in {time.perf_counter() - t:.0f} s: {json.dumps(info)}", flush=True)
    return files, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sdcpp_out")
    ap.add_argument("--side", type=int, default=256, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="stable-diffusion.cpp's own log")
    args = ap.parse_args()
    try:
        import stable_diffusion_cpp  # noqa: F401
    except ImportError:
        sys.exit('stable-diffusion.cpp is not installed: pip install -e ".[runtimes]"')
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    unets, info = write_unets(out)
    parts = build_components(out)
    models = {label: str(combined(Path(unet), parts, out)) for label, unet in unets.items()}
    files = {"models": models, "images": {k: str(out / f"image_{i}.npy") for i, k in enumerate(unets)},
             "verbose": args.verbose}  # fmt: skip
    converted = rules_check(out, Path(unets["F16"]), Path(unets[MIXED]))
    res = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(files), str(args.side), str(args.threads)],
        capture_output=True,
        text=True,
        cwd=out,
    )
    if res.returncode != 0:
        sys.exit(f"stable-diffusion.cpp failed:\n{res.stderr[-4000:]}")
    timing = json.loads(res.stdout.strip().splitlines()[-1])
    f16, mixed = (np.load(files["images"][k]) for k in unets)
    result = {
        "files": info,
        "timing_cpu_s": timing,
        "tensor_type_rules": converted,
        "mixed_vs_f16": {"mse": float(np.mean((mixed - f16) ** 2)), "max_abs": float(np.abs(mixed - f16).max())},
        "side": args.side,
        "threads": args.threads,
    }
    (out / "sdcpp.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
