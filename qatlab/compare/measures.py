"""Follow-up measures of a comparison grid: the measures of :mod:`qatlab.measure` (one
registry, one signature ``fn(ctx, **options) -> dict``), run on a trained cell.

A follow-up entry ``{measure: NAME, when: {...}, **options}`` names a registered measure and its
options; the keys it returns become columns of the cell's result row, shown in reports under
the columns the measure declared at registration. Nothing here needs an edit when a measure is
added: register it in :mod:`qatlab.measure`.

Any follow-up may say which weights it measures: ``checkpoint: best`` (the default: the model
the run ended with, its best epoch when it restored it), ``final`` (the last epoch's weights,
``ckpt.pt``; its keys get a ``final_`` prefix) or ``both``. When the best epoch is the last,
the final keys are copies (the same weights are not measured twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatlab.measure import bn_reestimate, crossbit_measure, oscillation, ptq_measure  # noqa: F401
from qatlab.measure.oscillation import LOGGED, logged_stats, reduce_series
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
    "reduce_series",
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
    check_options(name, _options(spec), "follow-up")
    check = getattr(MEASURES[name].fn, "check", None)  # a measure's own check of its values
    if callable(check):
        check(**_options(spec))
    if spec.get("checkpoint", "best") not in CHECKPOINTS:
        raise ConfigError(
            f"follow-up {name}: checkpoint must be one of {', '.join(CHECKPOINTS)}, "
            f"got {spec['checkpoint']!r}"
        )


CHECKPOINTS = ("best", "final", "both")
NOT_OPTIONS = ("measure", "when", "checkpoint")
FINAL = "final_"


def _options(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in NOT_OPTIONS}


def run_follow_up(ctx: CellContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one follow-up on a cell (on its best and/or final weights, ``checkpoint``); its
    numbers are also added to ``ctx.results``."""
    measure, options = MEASURES[spec["measure"]], _options(spec)
    which = spec.get("checkpoint", "best")
    out: dict[str, Any] = {}
    if which in ("best", "both"):
        out.update(measure(ctx, **options))
        ctx.results.update(out)
    if which in ("final", "both"):
        summary = getattr(ctx, "summary", {}) or {}
        same = summary.get("final_epoch") is not None and summary.get("final_epoch") == summary.get(
            "epochs_run"
        )  # the run ended on its last epoch: the final weights are the measured ones
        if same and which == "both":
            final = {k: v for k, v in out.items()}
        else:
            final = measure(FinalView(ctx), **options)
        final = {f"{FINAL}{k}": v for k, v in final.items()}
        ctx.results.update(final)
        out.update(final)
    return out


class FinalView:
    """A measure context showing the last epoch's weights (``ckpt.pt``) as its model; files go
    to ``final/`` beside the run's, and earlier results are the ``final_`` ones."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self.results = {k[len(FINAL) :]: v for k, v in ctx.results.items() if k.startswith(FINAL)}
        self.out_dir = Path(ctx.out_dir) / "final"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def model(self) -> Any:
        model = self._ctx.final_model()
        if model is None:
            from qatlab.errors import ConfigError

            raise ConfigError("checkpoint: final needs the run's ckpt.pt (its last epoch)")
        return model

    def final_model(self) -> Any:
        return self._ctx.final_model()
