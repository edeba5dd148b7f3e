"""Training: the loop (``fit``/``evaluate``), the hook interface methods plug into, run
configuration, checkpoints, metrics files and plots.

Two ways in: ``fit(model, data, TrainConfig(...), hooks=[...])`` for a model you built, or
``run(load_config("configs/x.yaml"))`` to build data, model, quantization and method hooks from a
config (what ``qatlab train`` does).
"""

from qatlab.methods.base import Hook
from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from qatlab.train.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from qatlab.train.loop import evaluate, fit, train_step
from qatlab.train.runner import build, evaluate_checkpoint, ptq_sweep, run

__all__ = [
    "DataConfig",
    "Hook",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "load_checkpoint",
    "load_config",
    "model_from_checkpoint",
    "ptq_sweep",
    "run",
    "save_checkpoint",
    "train_step",
]
