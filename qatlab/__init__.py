"""qatlab: quantization-aware training and the measurements to see why it works.

The idiom::

    qmodel = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    # ... your own training loop ...
"""

import importlib

from qatlab.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from qatlab.quant import (
    QuantConfig,
    Quantizer,
    calibrate,
    inspect,
    ptq,
    quantization_disabled,
    quantize,
    reestimate_bn,
    set_bits,
)

__version__ = "0.1.0"

_SUBPACKAGES = ("methods", "measure", "data", "models", "train", "compare", "export")


def __getattr__(name: str):
    """``qatlab.measure``, ``qatlab.methods``, ... after a bare ``import qatlab``, loaded on
    first use so that ``import qatlab`` stays light and every layer imports only what it needs."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"qatlab.{name}")
    raise AttributeError(f"module 'qatlab' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "TrainingDiverged",
    "QuantConfig",
    "Quantizer",
    "calibrate",
    "inspect",
    "measure",
    "ptq",
    "quantization_disabled",
    "quantize",
    "reestimate_bn",
    "set_bits",
]
