"""Follow-up measures of a comparison grid: the measures of :mod:`qatlab.measure` (one
registry, one signature ``fn(ctx, **options) -> dict``), run on a trained cell.

A follow-up entry ``{measure: NAME, when: {...}, **options}`` names a registered measure and its
options; the keys it returns become columns of the cell's result row, shown in reports under
the columns the measure declared at registration. Nothing here needs an edit when a measure is
added: register it in :mod:`qatlab.measure`.
"""

from __future__ import annotations

from typing import Any

from qatlab.measure import bn_reestimate, crossbit_measure, oscillation, ptq_measure  # noqa: F401
from qatlab.measure.oscillation import LOGGED, logged_stats
from qatlab.measure.registry import (
    COLUMNS,
    MEASURES,
    SECTIONS,
    Column,
    Section,
    check_options,
    column_for,
    is_number,
    register_column,
    register_measure,
)
from qatlab.train.context import RunContext

ptq = ptq_measure
crossbit = crossbit_measure

__all__ = [
    "COLUMNS",
    "LOGGED",
    "MEASURES",
    "SECTIONS",
    "CellContext",
    "Column",
    "Section",
    "check_follow_up",
    "column_for",
    "is_number",
    "logged_stats",
    "register_column",
    "register_measure",
    "run_follow_up",
]


class CellContext(RunContext):
    """What a follow-up sees of a grid's cell: its config and folder, its summary, and the
    result row so far (``results``); the seed is the cell's training seed; no progress bars."""

    def __init__(self, cfg, summary: dict[str, Any], results: dict[str, Any] | None = None):
        super().__init__(cfg.run_dir, cfg=cfg, results=results)
        self.summary = summary


def check_follow_up(spec: dict[str, Any]) -> None:
    """A follow-up entry ``{measure: NAME, when: {...}, **options}``: one ConfigError if wrong."""
    import difflib

    from qatlab.errors import ConfigError

    name = spec.get("measure")
    if name not in MEASURES:
        hint = difflib.get_close_matches(str(name), list(MEASURES), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown follow-up measure {name!r}{tip}; available: {', '.join(sorted(MEASURES))}"
        )
    check_options(
        name, {k: v for k, v in spec.items() if k not in ("measure", "when")}, "follow-up"
    )


def run_follow_up(ctx: CellContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one follow-up on a cell; its numbers are also added to ``ctx.results``."""
    options = {k: v for k, v in spec.items() if k not in ("measure", "when")}
    out = MEASURES[spec["measure"]](ctx, **options)
    ctx.results.update(out)
    return out
