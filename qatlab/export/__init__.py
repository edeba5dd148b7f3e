"""Export: a trained quantized model as ONNX (QuantizeLinear/DequantizeLinear, integer weights,
checked in ONNX Runtime) or as integer weights + scales for custom runtimes.

Both read weight integers from the quantizer (:meth:`qatlab.Quantizer.integer`), the one place
they are computed, so frozen weights export their frozen integers.
"""

from qatlab.export.integer import dequantize_weights, load_integer, to_integer
from qatlab.export.onnx import ExportReport, check_exportable, onnx_metadata, to_onnx

__all__ = [
    "ExportReport",
    "check_exportable",
    "dequantize_weights",
    "load_integer",
    "onnx_metadata",
    "to_integer",
    "to_onnx",
]
