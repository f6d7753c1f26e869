"""Every closed set of values a setting takes, declared once: the config validator, the command-line options and
the code that acts on a value all read them from here (weight-format names are a registry of classes instead:
:mod:`mpq.quant.formats`)."""

from __future__ import annotations

import torch

# target: the runtime the plan is for, and the weight candidates it sets when a config does not (mpq: none, its own
# quantizer's integer widths, quant.bits; sdnq: SDNQ's dtypes, exported with `mpq export --format sdnq`). SDNQ's
# default groups shrink with the bits and its scales are fp32 (uint2 costs 6 bits a weight on a Linear, 10 on a
# Conv2d), so the list holds rows and groups of 64 up to 4 bits and rows above: on tiny-sdxl SDNQ's own front at
# equal bytes is uint2/uint3 and int4/uint4 row-wise, int5/int6/int8 row-wise (benchmarks/bench_sdnq_plans.py)
TARGETS: dict[str, tuple[str, ...]] = {
    "mpq": (),
    "sdnq": (
        "sdnq-uint2-row",
        "sdnq-uint2-g64",
        "sdnq-uint3-row",
        "sdnq-uint3-g64",
        "sdnq-int4-row",
        "sdnq-int4-g64",
        "sdnq-uint4-row",
        "sdnq-int5-row",
        "sdnq-int6-row",
        "sdnq-int8-row",
    ),
    # the ggml types the gguf package writes and every GGUF runtime reads (diffusers, ComfyUI-GGUF, sd.cpp)
    "gguf": ("gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0"),
}
KINDS = ("weight", "act")  # what a plan quantizes: a layer's weights, or its input activations
METRICS = ("sqnr", "ssim")  # SQNR of the denoiser output (every layer), SSIM of images (the content group)
ESTIMATORS = ("local", "fisher")  # sensitivity estimates (and hybrid's estimate)
METHODS = ("fast", "naive", *ESTIMATORS, "hybrid")  # sensitivity methods: exact (fast = naive's numbers), estimates
SHARE_BITS = ("auto", "always", "never")  # sensitivity.share_bits
SSIM_KINDS = ("mixdq", "gaussian")  # sensitivity.ssim: MixDQ's uniform-window SSIM, or the Gaussian one

MIN_BITS, MAX_BITS = 2, 8  # quant.bits: the integer widths the quantizer calibrates and the export packs
LEVELS = ("symmetric", "asymmetric")  # quant.weight.levels
GRANULARITIES = ("tensor", "channel", "kernel", "group")  # quant.weight.granularity
SCALE_METHODS = ("minmax", "mse")  # quant.weight.scale_method
ACT_CALIBRATIONS = ("mpq", "mixdq")  # quant.act.calibration

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # model/sensitivity/export dtypes

# sampling.scheduler: "keep" (the pipeline's own) or an override: diffusers class, and whether it samples flow matching
SCHEDULERS = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", False),
    "euler": ("EulerDiscreteScheduler", False),
    "ddim": ("DDIMScheduler", False),
    "dpm": ("DPMSolverMultistepScheduler", False),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", True),
}
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")  # sampling.timestep_spacing
