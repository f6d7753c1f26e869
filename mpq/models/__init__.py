"""Model loading: a hub id, a local diffusers folder, or the embedded default.

All three end in the same ``DiffusionPipeline.from_pretrained`` call: the
embedded model is built once in code and saved as a diffusers folder in the
cache (``$MPQ_CACHE``, default ``~/.cache/mpq``), then loaded like any other.
"""

from mpq.models.loader import (
    DTYPES,
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
    "DTYPES",
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
