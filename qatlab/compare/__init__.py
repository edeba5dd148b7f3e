"""Comparisons: grids of training runs, the engine that runs them resumably, and their reports.

``qatlab compare GRID.yaml|PRESET`` expands a grid (:mod:`qatlab.compare.spec`), runs its
cells on worker processes or Ray (:mod:`qatlab.compare.engine`), measures each
(:mod:`qatlab.compare.measures`) and writes the report (:mod:`qatlab.compare.report`).
Presets live in ``qatlab/compare/presets``.
"""

# the opt-in report sections register themselves (qatlab.compare.sections) when imported
from qatlab.compare import generalization_section  # noqa: F401
from qatlab.compare.report import build_report, markdown_table, mean_std
from qatlab.compare.spec import load_grid, presets

__all__ = [
    "build_report",
    "load_grid",
    "markdown_table",
    "mean_std",
    "presets",
]
