"""Model loading: a hub id, a local diffusers folder, an embedded model, or ``random:<hub id>``.

The first three end in the same ``DiffusionPipeline.from_pretrained`` call:
an embedded random model is built once in code and saved as a diffusers folder
in the cache (``$MPQ_CACHE``, default ``~/.cache/mpq``), then loaded like any
other. ``random:<hub id>`` builds that model's architecture with random weights
in memory, from the architecture file shipped in ``arch/``.
"""

from mpq.models.loader import (
    EMBEDDED_PREFIX,
    denoiser_name,
    denoiser_of,
    load_arch,
    load_pipeline,
    meta_denoiser,
    pipeline_in,
    resolve_device,
    torch_dtype,
)

__all__ = [
    "EMBEDDED_PREFIX",
    "denoiser_name",
    "denoiser_of",
    "load_arch",
    "load_pipeline",
    "meta_denoiser",
    "pipeline_in",
    "resolve_device",
    "torch_dtype",
]
