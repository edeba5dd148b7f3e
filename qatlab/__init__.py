"""qatlab: quantization-aware training and the measurements to see why it works.

The idiom::

    qmodel = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    qatlab.calibrate(qmodel, first_train_batches)
    optimizer = qatlab.optimizer(qmodel, "sgd", lr=0.05)  # step sizes in their own group
    # ... your own training loop ...
"""

import importlib
from typing import Any

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


def optimizer(model: Any, name: str = "adam", lr: float = 1e-3, **options: Any) -> Any:
    """The optimizer ``qatlab train`` builds, for your own loop: the weights with ``name``
    (adam, adamw, sgd) at ``lr``, the quantizer step sizes in their own groups on the
    trainer's recipe (Adam on ``log s`` from scratch; ``fine_tune=True`` from a float
    checkpoint). Options: see :func:`qatlab.train.optim.optimizer`."""
    from qatlab.train.optim import optimizer as build

    return build(model, name, lr, **options)


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
    "optimizer",
    "ptq",
    "quantization_disabled",
    "quantize",
    "reestimate_bn",
    "set_bits",
]
