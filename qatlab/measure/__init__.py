"""Measurements of trained models: accuracy, cross-bit (PTQ) accuracy. Never imports the trainer."""

from qatlab.measure.accuracy import evaluate
from qatlab.measure.crossbit import cross_bit, ptq_accuracy, ptq_config

__all__ = ["cross_bit", "evaluate", "ptq_accuracy", "ptq_config"]
