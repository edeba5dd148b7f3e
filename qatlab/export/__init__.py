"""Export: a trained quantized model as ONNX (QuantizeLinear/DequantizeLinear, integer weights,
checked in ONNX Runtime) or as integer weights + scales for custom runtimes.

Both read weight integers from the quantizer (:meth:`qatlab.Quantizer.integer`), the one place
they are computed, so frozen weights export their frozen integers.
"""

from qatlab.export.integer import dequantize_weights, load_integer, to_integer
from qatlab.export.onnx import ExportReport, check_exportable, onnx_metadata, to_onnx
from qatlab.export.runtime import INTEGER_KERNELS, integer_kernels, optimized_ops, session

__all__ = [
    "INTEGER_KERNELS",
    "ExportReport",
    "check_exportable",
    "dequantize_weights",
    "integer_kernels",
    "load_integer",
    "onnx_metadata",
    "optimized_ops",
    "session",
    "to_integer",
    "to_onnx",
]
