"""Fake-quantization: the quantizer primitives, quantized layers, the model wrapper, the structure trace."""

from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mpq.quant.model import QuantModel
from mpq.quant.quantizer import act_qparams, fake_quant, qrange, weight_scale

__all__ = [
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantModel",
    "act_qparams",
    "fake_quant",
    "qrange",
    "weight_scale",
]
