"""mpq: mixed-precision quantization search for diffusion models (MixDQ-compatible).

The Python API: :func:`quantize_` applies a :class:`BitPlan` with a PTQ
checkpoint's quant params to a pipeline or its denoiser, in place.
"""

from mpq.api import QuantizedModel, quantize_
from mpq.errors import MpqError
from mpq.plan import BitPlan, CostModel

__version__ = "0.1.0"
__all__ = ["BitPlan", "CostModel", "MpqError", "QuantizedModel", "__version__", "quantize_"]
