"""mpq: mixed-precision quantization search for diffusion models (MixDQ-compatible).

The Python API: :func:`quantize_` applies a :class:`BitPlan` with a PTQ
checkpoint's quant params to a pipeline or its denoiser, in place;
:func:`load_quantized` loads a pipeline exported with ``mpq export`` (packed
low-bit weights).
"""

import logging as _logging

# torchao (an optional dependency that diffusers imports when present) logs its unsupported CUDA extensions and
# deprecations at import: noise on every command, whether or not the torchao path is used
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from mpq.api import QuantizedModel, quantize_  # noqa: E402
from mpq.errors import MpqError  # noqa: E402
from mpq.export import load_quantized  # noqa: E402
from mpq.plan import BitPlan, CostModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BitPlan", "CostModel", "MpqError", "QuantizedModel", "__version__", "load_quantized", "quantize_"]
