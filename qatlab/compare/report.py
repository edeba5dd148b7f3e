"""Aggregating rows over seeds and printing them as markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def mean_std(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Group ``rows`` by ``keys``; each metric becomes ``(mean, std, n)`` over the group."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key, strict=True))
        for m in metrics:
            values = [r[m] for r in members if r.get(m) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                agg[m] = (statistics.fmean(values), std, len(values))
            else:
                agg[m] = None
        out.append(agg)
    return out


def fmt(value: Any, scale: float = 100.0, digits: int = 1) -> str:
    """``(mean, std, n)`` as ``mean ± std``; scaled (percent by default)."""
    if value is None:
        return "–"
    if isinstance(value, tuple):
        mean, std, _ = value
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], scales: dict | None = None
) -> str:
    """A markdown table; ``columns`` are ``(key, header)``; numbers via :func:`fmt`."""
    scales = scales or {}
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            scale, digits = scales.get(key, (100.0, 1))
            cells.append(fmt(value, scale, digits) if not isinstance(value, str) else value)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
