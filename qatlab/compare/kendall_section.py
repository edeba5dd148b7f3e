"""Opt-in report section ``kendall``: how well each measure ranks the generalization gap over
the population of a comparison's models (Kendall's tau, as Jiang et al. 2019), overall and
per bit width. Every registered numeric column takes part, so new measures join on their own.
"""

from __future__ import annotations

from qatlab.compare.report import Results, Table, _bits_of, bits_order, register_section
from qatlab.measure.registry import column_for, is_number
from qatlab.measure.stats import kendall_tau

TARGET = "gap_acc"
SKIP = ("wall_time_s",)


@register_section("kendall", default=False)
def _kendall(res: Results) -> list:
    rows = [r for r in res.rows if is_number(r.get(TARGET))]
    if len(rows) < 3:
        return []
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in keys or key == TARGET or key in SKIP or not is_number(value):
                continue
            if column_for(key) is not None:
                keys.append(key)
    widths = sorted({_bits_of(r) for r in rows}, key=bits_order)[::-1]
    headers = ["measure", "tau (all)", "n"] + (widths if len(widths) > 1 else [])
    table = Table(headers, [])
    for key in keys:
        cells = [column_for(key)[1] + f" ({key})"]
        pairs = [(r[key], r[TARGET]) for r in rows if is_number(r.get(key))]
        if len(pairs) < 3:
            continue
        cells += [_tau(pairs), str(len(pairs))]
        if len(widths) > 1:
            for w in widths:
                part = [
                    (r[key], r[TARGET]) for r in rows if _bits_of(r) == w and is_number(r.get(key))
                ]
                cells.append(_tau(part) if len(part) >= 3 else "–")
        table.rows.append(cells)
    return [
        ("h2", "Kendall's tau of each measure with the generalization gap"),
        (
            "p",
            f"Rank correlation (tau-b) between each measure and the accuracy gap ({TARGET}, "
            "train - test) over every finished model of this comparison (all seeds and "
            "settings), and within each bit width. +1: the measure orders the models exactly "
            "as their gaps; a sharpness measure that predicts generalization has tau > 0.",
        ),
        ("table", table),
    ]


def _tau(pairs: list[tuple[float, float]]) -> str:
    tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
    return "–" if tau != tau else f"{tau:+.2f}"
