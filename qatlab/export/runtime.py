"""Running an exported model in ONNX Runtime: a session at a chosen optimization level, and the
integer kernels its CPU graph optimizer produced (what the export is for)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from qatlab.errors import ConfigError

INTEGER_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
)
LEVELS = ("off", "basic", "extended", "all")


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - the export extra installs it
        raise ConfigError(
            "running an exported model needs onnxruntime; pip install 'qatlab[export]'"
        ) from None
    return onnxruntime


def session(
    model: str | Path | bytes,
    optimize: str = "extended",
    threads: int | None = None,
    optimized_path: str | Path | None = None,
):
    """An ``onnxruntime.InferenceSession`` on the CPU at graph optimization level ``optimize``
    (off, basic, extended, all); ``optimized_path`` saves the graph as ORT optimized it."""
    ort = _ort()
    if optimize not in LEVELS:
        raise ConfigError(f"optimize must be one of {LEVELS}, got {optimize!r}")
    level = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimize]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def optimized_ops(model: str | Path | bytes, optimize: str = "extended") -> Counter:
    """Node types of the graph after ONNX Runtime's CPU optimizer, with their counts."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(model, optimize, threads=1, optimized_path=out)
        graph = onnx.load(str(out)).graph
    return Counter(node.op_type for node in graph.node)


def integer_kernels(model: str | Path | bytes, optimize: str = "extended") -> int:
    """How many integer kernels (QLinearConv, QGemm, ConvInteger, MatMulInteger, ...) the
    optimized graph runs."""
    ops = optimized_ops(model, optimize)
    return sum(ops[k] for k in INTEGER_KERNELS)
