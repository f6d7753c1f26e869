"""Real low-bit export of a plan: the ``mpq`` packed format, a torchao ``FqnToConfig``, AIMET-style encodings."""

from mpq.export.mpq_format import (
    export_mpq,
    load_denoiser,
    load_quantized,
    serialized_bytes,
    tensor_bytes,
)

__all__ = ["export_mpq", "load_denoiser", "load_quantized", "serialized_bytes", "tensor_bytes"]
