"""Fake-quantization: one uniform quantizer, quantized layers, the model wrapper."""

from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mpq.quant.model import LayerInfo, QuantModel
from mpq.quant.quantizer import act_qparams, fake_quant, qrange, weight_scale

__all__ = ["LayerInfo", "QuantConv2d", "QuantLayer", "QuantLinear", "QuantModel", "act_qparams", "fake_quant", "qrange", "weight_scale"]
