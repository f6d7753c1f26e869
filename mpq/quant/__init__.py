"""Fake-quantization: the quantizer primitives, quantized layers, the model wrapper, the structure trace."""

from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mpq.quant.model import QuantModel
from mpq.quant.quantizer import WeightQuant, act_qparams, fake_quant, grouped_qparams, qrange

__all__ = [
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantModel",
    "WeightQuant",
    "act_qparams",
    "fake_quant",
    "grouped_qparams",
    "qrange",
]
