"""mpq: mixed-precision quantization search for text-to-image diffusion models."""

from mpq.errors import MpqError

__version__ = "0.1.0"
__all__ = ["MpqError", "__version__"]
