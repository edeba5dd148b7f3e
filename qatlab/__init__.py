"""qatlab: quantization-aware training and the measurements to see why it works.

The idiom::

    qmodel = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    # ... your own training loop ...
"""

from qatlab import measure  # so qatlab.measure.crossbit.cross_bit works after `import qatlab`
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
