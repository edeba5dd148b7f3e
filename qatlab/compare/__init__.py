"""Grids of runs, their results, and the reports in ``docs/results``.

Each study is a preset: ``python -m qatlab.compare oscillations`` (or ``oscreg``) trains every
run that is not finished yet (a killed study resumes), analyses them and writes
``<out>/<study>.md`` with its plots.
"""

from qatlab.compare.grid import run_jobs, train_job
from qatlab.compare.report import markdown_table, mean_std

__all__ = ["markdown_table", "mean_std", "run_jobs", "train_job"]
