"""mpq: mixed-precision quantization search for diffusion models (MixDQ-compatible).

The Python API: :func:`quantize_` applies a :class:`BitPlan` with a PTQ
checkpoint's quant params to a pipeline or its denoiser, in place;
:func:`load_quantized` loads a pipeline exported with ``mpq export`` (packed
low-bit weights); :class:`CostModel` prices a plan in bytes.
"""

from mpq.api import QuantizedModel, quantize_
from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.export import load_quantized
from mpq.export.diffusers_hub import register_on_import as _register_on_import
from mpq.plan import BitPlan

__version__ = "0.1.0"
_register_on_import()  # DiffusionPipeline.from_pretrained loads `mpq export` folders (mpq.export.diffusers_hub)
__all__ = ["BitPlan", "CostModel", "MpqError", "QuantizedModel", "__version__", "load_quantized", "quantize_"]
