"""Opt-in report sections of generalization studies: ``kendall``, how well each measure ranks
the generalization gap over the population of a comparison's models (Kendall's tau, as Jiang et
al. 2019), overall and per bit width (every registered numeric column takes part, so new
measures join on their own); ``landscapes``, the 1-D loss landscapes of the ``landscape``
measure overlaid by bit width.
"""

from __future__ import annotations

from qatlab.compare.report import Results, Table, _bits_of, bits_order, register_section
from qatlab.measure.registry import column_for, is_number
from qatlab.measure.stats import kendall_tau

TARGET = "gap_acc"
# the measures a generalization study ranks (accuracy, PTQ and corruption columns are outcomes,
# not predictors of the gap, and would only lengthen the table)
RANKED_SECTIONS = ("generalization", "noise", "flatness", "landscape")
SKIP = ("wall_time_s", "train_acc")


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
            column = column_for(key)
            if column is not None and column[0].section in RANKED_SECTIONS:
                keys.append(key)
    widths = sorted({_bits_of(r) for r in rows}, key=bits_order)[::-1]
    # populations: models of one data set and architecture (a gap on digits and one on
    # MNIST-1D are not on one scale, so the pooled tau mixes two questions)
    pops = sorted({_population(r) for r in rows})
    pop_cols = pops if len(pops) > 1 else []
    headers = ["measure", "tau (all)", "n"] + [f"tau {p}" for p in pop_cols]
    headers += ["mean within populations"] if pop_cols else []
    headers += widths if len(widths) > 1 else []
    table = Table(headers, [])
    for key in keys:
        cells = [column_for(key)[1] + f" ({key})"]
        pairs = [(r[key], r[TARGET]) for r in rows if is_number(r.get(key))]
        if len(pairs) < 3:
            continue
        cells += [_tau(pairs), str(len(pairs))]
        within = []
        for pop in pop_cols:
            part = [
                (r[key], r[TARGET]) for r in rows if _population(r) == pop and is_number(r.get(key))
            ]
            tau = (
                kendall_tau([p[0] for p in part], [p[1] for p in part]) if len(part) >= 3 else None
            )
            within += [tau] if tau is not None and tau == tau else []
            cells.append("–" if tau is None else _fmt_tau(tau))
        if pop_cols:
            cells.append(_fmt_tau(sum(within) / len(within)) if within else "–")
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
            "settings), within each population (one data set and model) and their mean, and "
            "within each bit width, for the measures of the generalization, "
            "noise, flatness and landscape sections. +1: the measure orders the models exactly "
            "as their gaps. The flatness and bound measures (1/sigma^2 and the bounds built on "
            "it) grow with sharpness, so one that predicts generalization has tau > 0; the "
            "radii sigma, sigma', alpha, alpha' grow with flatness (tau < 0 if they predict).",
        ),
        ("table", table),
    ]


def _tau(pairs: list[tuple[float, float]]) -> str:
    return _fmt_tau(kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]))


def _fmt_tau(tau: float) -> str:
    return "–" if tau != tau else f"{tau:+.2f}"


def _population(row: dict) -> str:
    """The data set and model a row's run trained: stage and model labels when present."""
    return " ".join(str(row[k]) for k in ("stage", "model") if row.get(k) not in (None, ""))


@register_section("landscapes", default=False)
def _landscapes(res: Results) -> list:
    """Mean 1-D landscape (training loss along the measure's random direction) per bit width,
    one panel per stage and model (averaged over seeds and the other axes)."""
    rows = [
        r
        for r in res.rows
        if isinstance(r.get("land_coords"), list)
        and isinstance(r.get("land_loss"), list)
        and r["land_loss"]
        and not isinstance(r["land_loss"][0], list)
    ]
    if not rows:
        return []
    from qatlab.compare.report import _pyplot
    from qatlab.train.plots import _save

    keys = [k for k in ("stage", "model") if any(r.get(k) not in (None, "") for r in rows)]
    panels: dict[tuple, dict[str, list[list[float]]]] = {}
    coords: dict[tuple, list[float]] = {}
    for r in rows:
        panel = tuple(str(r.get(k, "–")) for k in keys)
        coords.setdefault(panel, r["land_coords"])
        if r["land_coords"] != coords[panel]:
            continue  # another grid of points: not averaged with this one
        panels.setdefault(panel, {}).setdefault(_bits_of(r), []).append(r["land_loss"])
    plt = _pyplot()
    widths = sorted({b for per in panels.values() for b in per}, key=bits_order)[::-1]
    colors = {b: f"C{i}" for i, b in enumerate(widths)}  # one colour per width in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (panel, per) in zip(axes[0], panels.items(), strict=True):
        for bits in [w for w in widths if w in per]:
            curves = per[bits]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
            ax.plot(coords[panel], mean, color=colors[bits], label=f"{bits} (n={len(curves)})")
        ax.set_yscale("log")
        ax.set_title(" ".join(v for v in panel if v != "–") or "all", fontsize=9)
        ax.set_xlabel("step along the direction (filter-normalized)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (mean over models)")
    fig.tight_layout()
    _save(fig, res.out / "landscapes.png")
    plt.close(fig)
    return [
        ("h2", "Loss landscapes by bit width"),
        (
            "p",
            "Training loss (fixed training subset, eval mode) along one filter-normalized "
            "random direction through each trained model (biases and norm layers not moved; "
            "quantized models perturbed at q(w)), averaged over the models of each bit width.",
        ),
        ("img", "landscapes.png", "loss landscapes by bit width"),
    ]
