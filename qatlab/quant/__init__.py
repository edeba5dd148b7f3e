"""Quantization core: quantizers, quantized layers, quantize, calibration, BN, PTQ, inspection."""

from qatlab.quant.bn import reestimate_bn
from qatlab.quant.calibrate import batch_inputs, calibrate, ptq
from qatlab.quant.config import QuantConfig
from qatlab.quant.inspect import LayerInfo, inspect
from qatlab.quant.layers import (
    QuantConv1d,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    is_quantized,
    quant_layers,
    quantizers,
)
from qatlab.quant.quantize import dequantize, quantization_disabled, quantize, set_bits
from qatlab.quant.quantizer import Quantizer, fake_quantize, grid_range

__all__ = [
    "LayerInfo",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "Quantizer",
    "batch_inputs",
    "calibrate",
    "dequantize",
    "fake_quantize",
    "grid_range",
    "inspect",
    "is_quantized",
    "ptq",
    "quant_layers",
    "quantization_disabled",
    "quantize",
    "quantizers",
    "reestimate_bn",
    "set_bits",
]
