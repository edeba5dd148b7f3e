"""Quantization core: quantizers, quantized layers, quantize, calibration, BN, PTQ, inspection."""

from qatlab.quant.bn import reestimate_bn
from qatlab.quant.calibrate import batch_inputs, calibrate, ptq
from qatlab.quant.config import QuantConfig
from qatlab.quant.inspect import Inspection, LayerInfo, inspect
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
from qatlab.quant.transitions import TransitionCounter, Transitions, counted_layers
from qatlab.quant.weights import (
    KeptWeights,
    keep_quantized_weights,
    perturbed_weights,
    quantized_weights,
    release,
)

__all__ = [
    "KeptWeights",
    "Inspection",
    "LayerInfo",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "Quantizer",
    "TransitionCounter",
    "Transitions",
    "batch_inputs",
    "calibrate",
    "counted_layers",
    "dequantize",
    "fake_quantize",
    "grid_range",
    "inspect",
    "is_quantized",
    "keep_quantized_weights",
    "perturbed_weights",
    "ptq",
    "quant_layers",
    "quantization_disabled",
    "quantize",
    "quantized_weights",
    "quantizers",
    "reestimate_bn",
    "release",
    "set_bits",
]
