"""Measurements of trained models, behind one registry (:mod:`qatlab.measure.registry`):
accuracy, PTQ sweeps, cross-bit, BN re-estimation, the oscillation statistics of a method's
state, how TALR's controller followed its target, and the generalization measures (gap,
quantization noise, flatness, sharpness, PAC-Bayes bounds, loss landscapes, corruptions). Never
imports the trainer or the comparison engine."""

from qatlab.measure import (
    qgen,  # noqa: E402,F401  (registers gap, noise, flatness, ...)
    talr,  # noqa: E402,F401  (registers talr_tracking)
)
from qatlab.measure.accuracy import evaluate
from qatlab.measure.bn import bn_reestimate
from qatlab.measure.crossbit import cross_bit, crossbit_measure, ptq_accuracy, ptq_config
from qatlab.measure.oscillation import logged_stats, oscillation
from qatlab.measure.ptq import ptq_measure, ptq_sweep
from qatlab.measure.registry import (
    COLUMNS,
    MEASURES,
    SECTIONS,
    Column,
    Measure,
    MeasureContext,
    Section,
    atomic_path,
    check_options,
    column_for,
    get_measure,
    is_number,
    register_column,
    register_measure,
    register_report_section,
    run_measure,
)

__all__ = [
    "COLUMNS",
    "MEASURES",
    "SECTIONS",
    "Column",
    "Measure",
    "MeasureContext",
    "Section",
    "atomic_path",
    "bn_reestimate",
    "check_options",
    "column_for",
    "cross_bit",
    "crossbit_measure",
    "evaluate",
    "get_measure",
    "is_number",
    "logged_stats",
    "oscillation",
    "ptq_accuracy",
    "ptq_config",
    "ptq_measure",
    "ptq_sweep",
    "register_column",
    "register_measure",
    "register_report_section",
    "run_measure",
]
