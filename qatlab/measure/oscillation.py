"""Oscillation statistics of a QAT run: read from the training method's state at the end of
training (the ``oscillation`` measure), and the step-logged statistics of ``metrics.jsonl``."""

from __future__ import annotations

from typing import Any

import torch

from qatlab.measure.registry import (
    Column,
    MeasureContext,
    Section,
    register_column,
    register_measure,
)


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


# ----------------------------------------------------------------------------- reductions
REDUCTIONS = ("last", "first", "max", "min", "mean", "tail")
SERIES = ("auto", "step", "epoch")


def _is_epoch_record(record: dict[str, Any]) -> bool:
    """An epoch record (train/val numbers) rather than a step record of a hook or monitor."""
    return "train_loss" in record or "val_acc" in record or "val_loss" in record


def series(records: list[dict[str, Any]], key: str, kind: str = "auto") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` in ``metrics.jsonl`` records, in file order: its step
    records (``kind="step"``), its epoch records (``"epoch"``), or the step records if any hold
    ``key`` and else the epoch records (``"auto"``)."""

    def pick(epoch: bool) -> list[tuple[int, float]]:
        return [
            (int(r.get("step", r.get("epoch", 0)) or 0), float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)
            and _is_epoch_record(r) == epoch
        ]

    if kind == "epoch":
        return pick(True)
    steps = pick(False)
    return steps if steps or kind == "step" else pick(True)


def reduce_series(values: list[float], how: str, tail: float = 0.1) -> float | None:
    """One number from a logged series: ``last``, ``first``, ``max``, ``min``, ``mean`` or
    ``tail`` (the mean over the last ``tail`` fraction of the values, at least one)."""
    if not values:
        return None
    if how == "last":
        return values[-1]
    if how == "first":
        return values[0]
    if how == "max":
        return max(values)
    if how == "min":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    if how == "tail":
        n = max(1, round(len(values) * tail))
        return sum(values[-n:]) / n
    raise ValueError(f"unknown reduction {how!r}")


def _key_name(key: str) -> str:
    return key.replace("/", ".")


def _logged_label(rest: str) -> str:
    return f"{rest} (logged)"


@register_measure(
    "logged",
    columns=[Column("logged_", "{}", 1.0, 4, None, "logged", label=_logged_label)],
    section=Section(
        "logged",
        "Logged series: reductions",
        "Numbers logged during training (metrics.jsonl) reduced to one per run: last, max, "
        "mean, tail<k> = mean over the last k% of the logged values; mean ± std over seeds.",
    ),
)
def logged(
    ctx: MeasureContext,
    key: Any = "tr",
    reduce: Any = ("last",),
    tail: float = 0.1,
    series_kind: str = "auto",
) -> dict[str, Any]:
    """Reductions of a series logged in the run's ``metrics.jsonl`` (a method's or a monitor's
    numbers, or an epoch metric): ``logged_<key>_<how>`` for each ``how`` in ``reduce`` (last,
    first, max, min, mean, tail = the mean over the last ``tail`` fraction, keyed
    ``tail<percent>``). ``key`` may be a list. ``series_kind``: step, epoch or auto."""
    _check_logged(key, reduce, tail, series_kind)
    keys = [key] if isinstance(key, str) else list(key)
    hows = [reduce] if isinstance(reduce, str) else list(reduce)
    records = ctx.logged_records()
    out: dict[str, Any] = {}
    for k in keys:
        values = [v for _, v in series(records, k, series_kind)]
        for how in hows:
            name = f"tail{round(tail * 100):g}" if how == "tail" else how
            out[f"logged_{_key_name(k)}_{name}"] = reduce_series(values, how, tail)
    return out


def _check_logged(
    key: Any = "tr", reduce: Any = ("last",), tail: float = 0.1, series_kind: str = "auto"
) -> None:
    """The ``logged`` measure's values: one ConfigError line before anything runs."""
    from qatlab.errors import ConfigError

    keys = [key] if isinstance(key, str) else key
    hows = [reduce] if isinstance(reduce, str) else reduce
    if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"logged: key must be a logged key or a list of them, got {key!r}")
    if not isinstance(hows, (list, tuple)) or not hows or any(h not in REDUCTIONS for h in hows):
        raise ConfigError(f"logged: reduce must be among {', '.join(REDUCTIONS)}, got {reduce!r}")
    if series_kind not in SERIES:
        raise ConfigError(f"logged: series_kind must be one of {', '.join(SERIES)}")
    if not isinstance(tail, (int, float)) or not 0 < tail <= 1:
        raise ConfigError(f"logged: tail must be a fraction in (0, 1], got {tail!r}")


logged.check = _check_logged  # checked with the grid, before any cell runs
