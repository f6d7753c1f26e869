"""One denoiser forward per full-size family, on a GPU, at each model's real resolution, in fp16 and fp32.

    python benchmarks/gpu_forward.py [--configs sd15 sdxl-base ...] [--repeats 5]

The denoiser is built on the GPU from the architecture file shipped in
``mpq/models/arch`` (random weights: a forward costs the same), with example
inputs of the real shapes (batch 1; 2 rows under classifier-free guidance, as
the pipeline calls it). Prints a table of milliseconds per forward (median of
``--repeats`` after two warm-ups) and peak GPU memory: the forward times the
sensitivity and selection projections need, measured instead of assumed.
Prepared to run in well under 8 minutes on one large GPU (Flux.1 in fp32 needs
about 48 GB); it refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIGS = ("sd15", "sdxl-base", "sdxl-turbo", "pixart-sigma", "sd35-medium", "flux-schnell")


def time_forward(name: str, dtype: torch.dtype, repeats: int, device: str = "cuda") -> tuple[float, float, int]:
    """(median ms, peak GB, rows) of one denoiser forward of config ``name``."""
    import diffusers

    from mpq.families import family_of
    from mpq.models.loader import load_arch
    from mpq.runner.config import load_config

    cfg = load_config(name)
    arch = load_arch(cfg)
    den = arch["denoiser"]
    family = family_of(den["_class_name"])
    rows = 2 if family.doubles_batch(cfg.sampling.guidance_scale) else 1
    cuda = device == "cuda"
    with torch.device(device):
        model = getattr(diffusers, den["_class_name"]).from_config({k: v for k, v in den.items() if k[0] != "_"})
    model = model.to(dtype).eval().requires_grad_(False)
    if cuda:  # built in fp32, then cast: count from the model in its dtype
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokens = family.text_tokens(arch, cfg.sampling.max_sequence_length)
    side = cfg.sampling.resolution // arch["vae_scale_factor"]
    inputs = family.example_inputs(den, side, tokens, rows, device)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    inputs = {k: torch.randn_like(v) if k == family.sample_key else v for k, v in inputs.items()}
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model
    return statistics.median(times), peak, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu only to check the script itself (tiny configs)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_forward.py times GPU forwards: no CUDA device is visible")
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("\n| config | resolution | rows | fp16 ms | fp16 peak GB | fp32 ms | fp32 peak GB |")
    print("|---|---|---|---|---|---|---|")
    from mpq.runner.config import load_config

    for name in args.configs:
        res = load_config(name).sampling.resolution
        h_ms, h_gb, rows = time_forward(name, torch.float16, args.repeats, args.device)
        f_ms, f_gb, _ = time_forward(name, torch.float32, args.repeats, args.device)
        print(f"| {name} | {res} | {rows} | {h_ms:.1f} | {h_gb:.1f} | {f_ms:.1f} | {f_gb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
