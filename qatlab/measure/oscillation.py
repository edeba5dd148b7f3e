"""Oscillation statistics of a QAT run: read from the training method's state at the end of
training (the ``oscillation`` measure), and the step-logged statistics of ``metrics.jsonl``."""

from __future__ import annotations

from typing import Any

import torch

from qatlab.measure.registry import Column, MeasureContext, register_column, register_measure


@register_measure(
    "oscillation",
    columns=[
        Column("osc_share", "oscillating %", better="min", digits=2, section="oscillation"),
        Column("frozen_share", "frozen %", better=None, digits=2, section="oscillation"),
    ],
)
def oscillation(
    ctx: MeasureContext, threshold: float = 0.01, bins: int = 25, hist_max: float = 0.1
) -> dict[str, Any]:
    """At the end of training, from the method's saved state: share of weights whose
    oscillation frequency exceeds ``threshold``, share frozen, and the frequency histogram.
    Reads every hook that tracks oscillation frequencies (``frequencies()``; freezing hooks
    also have ``frozen_share()``); a run without one gives nothing."""
    trackers = [h for h in ctx.method_hooks() if callable(getattr(h, "frequencies", None))]
    if not trackers:
        return {}
    f = torch.cat([t.frequencies() for t in trackers])
    freezers = [t for t in trackers if callable(getattr(t, "frozen_share", None))]
    return {
        "osc_share": float((f > threshold).float().mean()),
        "frozen_share": _avg([t.frozen_share() for t in freezers]) if freezers else None,
        "osc_hist": torch.histc(f, bins=bins, min=0.0, max=hist_max).tolist(),
    }


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- logged
LOGGED = ("osc_share", "frozen_share", "tr")

register_column(Column("log_osc_share", "oscillating % (logged)", 100.0, 2, "min", "oscillation"))
register_column(
    Column("log_frozen_share", "frozen % (logged)", better=None, digits=2, section="oscillation")
)
register_column(Column("log_tr", "transition rate %", better=None, digits=3, section="oscillation"))


def logged_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of every step-logged statistic in ``metrics.jsonl`` (``osc_share``,
    ``frozen_share``, transition rate ``tr``...), as ``log_<name>`` keys."""
    out: dict[str, Any] = {}
    for r in records:
        for key in LOGGED:
            if isinstance(r.get(key), (int, float)):
                out[f"log_{key}"] = r[key]
    return out
