"""Comparison reports (Markdown, HTML, CSV/JSONL and plots from stored results), and the
older helpers that aggregate rows over seeds and print them as markdown."""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatlab.compare.measures import column_for, is_number
from qatlab.compare.sections import EXTRA_SECTIONS, SECTIONS, Table, register_section
from qatlab.measure.registry import SECTIONS as MEASURE_SECTIONS
from qatlab.measure.registry import column_rank


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
    return rows_table(rows, columns, scales).markdown()


def rows_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], scales: dict | None = None
) -> Table:
    """:class:`Table` of ``rows``: ``columns`` are ``(key, header)``, numbers via :func:`fmt`
    with ``scales[key] = (scale, digits)`` (percent, 1 digit by default)."""
    scales = scales or {}
    table = Table([h for _, h in columns], [])
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            scale, digits = scales.get(key, (100.0, 1))
            cells.append(value if isinstance(value, str) else fmt(value, scale, digits))
        table.rows.append(cells)
    return table


# ============================================================================= comparison reports
# A report is a list of blocks (heading, paragraph, table, image, code) built from the stored
# results alone, rendered to Markdown and to one self-contained HTML page. Sections come from
# a registry: ``@register_section`` adds one; each returns its blocks (none if it has nothing
# to show for this comparison).


@dataclass
class Results:
    """What a comparison folder holds: marker, cells, finished rows, failures, logs."""

    out: Path
    meta: dict
    cells: list[dict]
    label_columns: list[str]
    rows: list[dict]
    failures: list[dict]

    def records(self, cell: str) -> list[dict]:
        from qatlab.train.metrics import read_jsonl

        return read_jsonl(self.out / "cells" / cell / "metrics.jsonl")

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(c["stage"] for c in self.cells))

    def group_keys(self) -> list[str]:
        """The columns that name a row of the tables (seed excluded: it is aggregated)."""
        return (["stage"] if len(self.stages) > 1 else []) + self.label_columns


def load_results(out: str | Path) -> Results:
    """Read a comparison folder (no training, no model loading)."""
    from qatlab.compare.engine import KIND, MARKER
    from qatlab.errors import ConfigError

    out = Path(out)
    try:
        meta = json.loads((out / MARKER).read_text())
        cells_doc = json.loads((out / "cells.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{out} is not a qatlab comparison folder (no {MARKER})") from None
    if meta.get("kind") != KIND:
        raise ConfigError(f"{out} is not a qatlab comparison folder")
    rows, failures = [], []
    for cell in cells_doc["cells"]:
        folder = out / "cells" / cell["name"]
        if (folder / "result.json").is_file():
            rows.append(json.loads((folder / "result.json").read_text()))
        elif (folder / "failed.json").is_file():
            failures.append(json.loads((folder / "failed.json").read_text()))
    return Results(out, meta, cells_doc["cells"], cells_doc["label_columns"], rows, failures)


# ----------------------------------------------------------------------------- aggregation
def _groups(res: Results, rows: list[dict] | None = None) -> list[tuple[tuple, list[dict]]]:
    keys = res.group_keys()
    order: dict[tuple, list[dict]] = {}
    for cell in res.cells:  # grid order, even for groups with no finished cell yet
        order.setdefault(tuple(_key_value(cell, k) for k in keys), [])
    for row in res.rows if rows is None else rows:
        order.setdefault(tuple(row.get(k, "–") for k in keys), []).append(row)
    return [(k, v) for k, v in order.items() if v]


def _key_value(cell: dict, key: str):
    return cell["stage"] if key == "stage" else cell["labels"].get(key, "–")


def _stats(values: list) -> tuple[float, float, int] | None:
    values = [v for v in values if is_number(v)]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def _columns(res: Results, section: str) -> list[str]:
    keys: list[str] = []
    for row in res.rows:
        for key, value in row.items():
            entry = column_for(key)
            if entry and entry[0].section == section and is_number(value) and key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: column_rank(column_for(k)[0]))  # stable: first-seen within


def metric_table(res: Results, keys: list[str], rows: list[dict] | None = None) -> Table:
    """Rows = groups of cells (over seeds), columns = ``keys`` as mean ± std, best marked."""
    gkeys = res.group_keys()
    groups = _groups(res, rows)
    headers = gkeys + [column_for(k)[1] for k in keys] + ["n"]
    table = Table(headers, [])
    means: dict[int, list[tuple[int, float]]] = {}
    for i, (key, members) in enumerate(groups):
        cells = [str(v) for v in key]
        for j, metric in enumerate(keys):
            col = column_for(metric)[0]
            stats = _stats([m.get(metric) for m in members])
            if stats is None:
                cells.append("–")
                continue
            cells.append(_fmt(stats, col.scale, col.digits))
            if col.better:
                shown = round(stats[0] * col.scale, col.digits)
                means.setdefault(j, []).append((i, shown if col.better == "max" else -shown))
        cells.append(str(len(members)))
        table.rows.append(cells)
    _mark(table, {j + len(gkeys): v for j, v in means.items()}, gkeys)
    return table


def _mark(table: Table, values: dict[int, list[tuple[int, float]]], keys: list[str]) -> None:
    """Bold the best value of each column among the methods and bit widths of one setting
    (rows that agree on every other label: stage, model, data...), never across settings."""
    where = [n for n, k in enumerate(keys) if k not in ("method", "bits")]

    def stage_of(i: int) -> tuple:
        return tuple(table.rows[i][n] for n in where)

    for j, vals in values.items():
        for stage in {stage_of(i) for i, _ in vals}:
            part = [(i, v) for i, v in vals if stage_of(i) == stage]
            if len(part) < 2:
                continue
            best = max(v for _, v in part)
            table.marked |= {(i, j) for i, v in part if v == best}


def _fmt(stats: tuple[float, float, int], scale: float, digits: int) -> str:
    mean, std, n = stats
    if n == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def bits_order(label: str) -> tuple:
    """W2A2 < W3A3 < W4A4 < W8A8 < float (then anything else, alphabetically)."""
    m = re.fullmatch(r"W(\d+)A(\d+|-)", label)
    if m:
        return (0, int(m.group(1)), 99 if m.group(2) == "-" else int(m.group(2)), label)
    return (1 if label == "float" else 2, 0, 0, label)


def bits_pivot(res: Results) -> tuple[Table, list[str], dict] | None:
    """Test accuracy with one column per bit width (rows: the other labels). A float-trained
    row fills the bit-width columns with its post-training-quantized accuracy (marked PTQ)."""
    if "bits" not in res.label_columns:
        return None
    widths = sorted({_bits_of(r) for r in res.rows}, key=bits_order)
    widths = widths[::-1]  # float first, then the widest
    if len(widths) < 2:
        return None
    others = [k for k in res.group_keys() if k != "bits"]
    order: dict[tuple, dict[str, list]] = {}
    for cell in res.cells:
        order.setdefault(tuple(_key_value(cell, k) for k in others), {})
    for row in res.rows:
        per = order.setdefault(tuple(row.get(k, "–") for k in others), {})
        per.setdefault(_bits_of(row), []).append(row.get("test_acc"))
        if _bits_of(row) == "float":
            for w in widths:
                if f"ptq_{w}" in row:
                    per.setdefault(f"ptq:{w}", []).append(row[f"ptq_{w}"])
    with_desc = "method" in others
    headers = others + (["what it is"] if with_desc else []) + widths
    table = Table(headers, [])
    series: dict[str, dict[str, tuple]] = {}
    best: dict[int, list[tuple[int, float]]] = {}
    for key, per in order.items():
        if not per:
            continue
        cells = [str(v) for v in key]
        if with_desc:
            cells.append(_describe(key[others.index("method")]))
        line: dict[str, tuple] = {}
        for w in widths:
            stats, ptq = _stats(per.get(w, [])), False
            if stats is None:
                stats, ptq = _stats(per.get(f"ptq:{w}", [])), True
            if stats is None:
                cells.append("–")
                continue
            cells.append(_fmt(stats, 100.0, 1) + (" (PTQ)" if ptq else ""))
            line[w] = (stats[0], ptq)
            if not ptq:
                best.setdefault(len(cells) - 1, []).append((len(table.rows), round(stats[0], 3)))
        table.rows.append(cells)
        series[" ".join(str(v) for v in key) or "all"] = line
    _mark(table, best, others)
    return table, widths, series


def _bits_of(row: dict) -> str:
    return row.get("bits", row["bits_trained"])


def _describe(method: str) -> str:
    from qatlab import methods

    spec = methods.METHODS.get(method)
    return spec.description if spec is not None else ""


# ----------------------------------------------------------------------------- sections
@register_section("header")
def _header(res: Results) -> list:
    meta, n = res.meta, len(res.cells)
    train_s = sum(r.get("wall_time_s") or 0.0 for r in res.rows)
    seeds = sorted({c["seed"] for c in res.cells})
    left = n - len(res.rows) - len(res.failures)
    source = meta.get("source") or meta["grid_name"]
    blocks: list = [("h1", f"Comparison: {meta['grid_name']}")]
    desc = meta["grid"].get("description")
    if desc:
        blocks.append(("p", " ".join(str(desc).split())))
    blocks.append(
        (
            "p",
            f"{n} cells ({len(res.rows)} finished, {len(res.failures)} failed, {left} not run), "
            f"seeds {', '.join(map(str, seeds))}; training time summed over the finished cells "
            f"{train_s / 60:.1f} min. Grid: `{source}`. The same command again runs only "
            "what is missing; `qatlab report` on this folder rebuilds this page from the stored "
            "results.",
        )
    )
    blocks.append(("p", "Every finished cell's row: [results.csv](results.csv)."))
    return blocks


@register_section("bits")
def _bits(res: Results) -> list:
    pivot = bits_pivot(res)
    if pivot is None:
        return []
    table, _, _ = pivot
    _plot_bits(res, pivot)
    return [
        ("h2", "Test accuracy by bit width"),
        (
            "p",
            "Test accuracy %, mean ± std over seeds, best per column in bold. '(PTQ)': a model "
            "trained in float, then post-training quantized at that width.",
        ),
        ("table", table),
        ("img", "acc_vs_bits.png", "accuracy vs bits"),
    ]


@register_section("accuracy")
def _accuracy(res: Results) -> list:
    keys = _columns(res, "accuracy")
    if not res.rows:
        return [("h2", "Results"), ("p", "No cell has finished yet.")]
    _plot_curves(res)
    return [
        ("h2", "Results"),
        (
            "p",
            "Mean ± std over seeds (n = finished seeds); accuracy in %, best per column in bold; "
            "train time = training seconds per cell.",
        ),
        ("table", metric_table(res, keys)),
        ("img", "curves.png", "validation accuracy over training"),
    ]


@register_section("contrasts")
def _contrasts(res: Results) -> list:
    """The grid's ``contrasts:``: each arm against its control, paired by seed."""
    from qatlab.compare.contrasts import contrast_blocks

    return contrast_blocks(res)


@register_section("per_seed")
def _per_seed(res: Results) -> list:
    """Every finished cell's own row (HTML only, collapsed): what the means are made of."""
    if not res.rows:
        return []
    return [("details", "Per-seed results (one row per finished cell)", per_seed_table(res))]


def per_seed_table(res: Results) -> Table:
    """One row per finished cell in grid order: its arm, labels, seed, test and validation
    accuracy, the other accuracy columns and the metrics the grid's contrasts compare."""
    from qatlab.compare.contrasts import arms_of

    keys = ["test_acc", "val_acc"] + [k for k in _columns(res, "accuracy") if k != "test_acc"]
    for contrast in res.meta["grid"].get("contrasts") or []:
        metric = contrast.get("metric") if isinstance(contrast, dict) else None
        keys += metric if isinstance(metric, list) else [metric]
    keys = [k for k in dict.fromkeys(keys) if isinstance(k, str)]
    keys = [k for k in keys if any(is_number(r.get(k)) for r in res.rows)]
    arm_of = {r["cell"]: a.name for a in arms_of(res) for r in a.cells.values()}
    gkeys = [k for k in res.group_keys() if k != "arm"]
    headers = ["cell", "arm", *gkeys, "seed"]
    headers += [column_for(k)[1] if column_for(k) else k.replace("_acc", " acc %") for k in keys]
    table = Table(headers, [])
    order = {c["name"]: i for i, c in enumerate(res.cells)}
    for row in sorted(res.rows, key=lambda r: order.get(r["cell"], len(order))):
        cells = [row["cell"], arm_of.get(row["cell"], "–")]
        cells += [str(row.get(k, "–")) for k in gkeys] + [str(row.get("seed", "–"))]
        for key in keys:
            value, entry = row.get(key), column_for(key)
            scale = entry[0].scale if entry else (100.0 if key.endswith("_acc") else 1.0)
            digits = 2 if scale == 100.0 else (entry[0].digits if entry else 4)
            cells.append(f"{value * scale:.{digits}f}" if is_number(value) else "–")
        table.rows.append(cells)
    return table


@register_section("crossbit")
def _crossbit(res: Results) -> list:
    keys = _columns(res, "crossbit")
    if not keys:
        return []
    rows = [r for r in res.rows if any(k in r for k in keys)]
    return [
        ("h2", "Cross-bit accuracy (post-training quantization of each trained model)"),
        ("table", metric_table(res, sorted(keys, key=_xb_order), rows)),
    ]


def _xb_order(key: str) -> tuple:
    family, _, label = key.partition("_")
    if label.isdigit():
        return (family, int(label), "")
    return (
        (family, 1000 if label in ("float", "trained") else 999, label)
        if not label.startswith("W")
        else (family,) + bits_order(label)[1:3] + (label,)
    )


@register_section("oscillation")
def _oscillation(res: Results) -> list:
    keys = _columns(res, "oscillation")
    if not keys:
        return []
    rows = [r for r in res.rows if any(is_number(r.get(k)) for k in keys)]
    blocks = [
        ("h2", "Oscillations, transitions and BatchNorm statistics"),
        (
            "p",
            "Shares in % of the tracked weights at the end of training; '(logged)': last value "
            "in metrics.jsonl; BN err: relative change of running mean/var on re-estimation.",
        ),
        ("table", metric_table(res, keys, rows)),
    ]
    if _plot_logged(res, "osc_share", "oscillation.png", "weights oscillating (%)"):
        blocks.append(("img", "oscillation.png", "oscillating share over training"))
    if _plot_hist(res):
        blocks.append(("img", "oscillation_hist.png", "oscillation frequency histogram"))
    return blocks


@register_section("logged_plots")
def _logged_plots(res: Results) -> list:
    """The grid's ``plots``: each logged series over training steps, one line per arm (mean
    over seeds)."""
    from qatlab.compare.contrasts import label_values
    from qatlab.compare.spec import check_plots

    blocks: list = []
    for plot in check_plots(res.meta["grid"].get("plots"), label_values(res.cells)):
        key = plot["key"]
        name = "logged_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
        ylabel = plot.get("ylabel") or key
        scale = float(plot.get("scale", 1.0))
        arms, log = plot.get("arms"), plot.get("log", False)
        if _plot_logged(res, key, name, ylabel, scale=scale, by_arm=True, arms=arms, log=log):
            if not blocks:
                blocks.append(("h2", "Logged series"))
            title = plot.get("title") or f"{key} over training, mean over seeds, per arm"
            blocks.append(("img", name, title))
    return blocks


@register_section("selections")
def _selections(res: Results) -> list:
    """What each selecting stage chose per arm, from the validation means over its seeds."""
    try:
        chosen = json.loads((res.out / "cells.json").read_text()).get("selections") or {}
    except (OSError, ValueError):
        return []
    blocks: list = []
    for stage, spec in chosen.items():
        picks = spec.get("chosen") or {}
        if not picks:
            continue
        if not blocks:
            blocks.append(("h2", "Selections"))
        users = sorted({c["stage"] for c in res.cells if any(
            u.get("stage") == stage for u in (c.get("uses") or {}).values())})  # fmt: skip
        blocks.append(
            (
                "p",
                f"Stage {stage} chose {spec['axis']} per arm by the mean {spec['metric']} "
                f"({spec['mode']}) over its seeds; used by {', '.join(users) or 'no stage'}. "
                "Validation numbers only: the chosen cells' test numbers come from other seeds "
                "when the using stage has its own.",
            )
        )
        values = list(dict.fromkeys(v for p in picks.values() for v in p["means"]))
        scale = 100.0 if spec["metric"].endswith("acc") else 1.0
        table = Table(["arm", "chosen", *(f"{spec['metric']} @ {v}" for v in values)], [])
        for arm, pick in picks.items():
            labels = json.loads(arm)
            name = " ".join(str(v) for v in labels.values()) or "all"
            means = [pick["means"].get(v) for v in values]
            table.rows.append(
                [name, pick["label"], *(fmt(m, scale, 2) if m is not None else "–" for m in means)]
            )
        blocks.append(("table", table))
    return blocks


# sections the report renders itself; every other section of a measure's columns gets a table
OWN_SECTIONS = ("accuracy", "crossbit", "oscillation")


@register_section("measures")
def _measures(res: Results) -> list:
    """One table per section of the registered measures' columns (``qatlab.measure``) that
    this comparison's rows fill: a new measure shows up here with no edit in compare/."""
    names: list[str] = []
    for row in res.rows:
        for key, value in row.items():
            entry = column_for(key)
            if entry and is_number(value) and entry[0].section not in OWN_SECTIONS:
                if entry[0].section not in names:
                    names.append(entry[0].section)
    order = list(MEASURE_SECTIONS)
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    blocks: list = []
    for name in names:
        keys = _columns(res, name)
        rows = [r for r in res.rows if any(is_number(r.get(k)) for k in keys)]
        section = MEASURE_SECTIONS.get(name)
        blocks.append(("h2", section.title if section else name))
        if section and section.text:
            blocks.append(("p", section.text))
        blocks.append(("table", metric_table(res, keys, rows)))
    return blocks


@register_section("time")
def _time(res: Results) -> list:
    if not res.rows:
        return []
    per: dict[str, list[float]] = {}
    for row in res.rows:
        per.setdefault(row["method_name"], []).append(row.get("wall_time_s") or 0.0)
    table = Table(["method", "cells", "total train time (min)", "per cell (s)"], [])
    for method, times in per.items():
        table.rows.append(
            [method, str(len(times)), f"{sum(times) / 60:.2f}", f"{sum(times) / len(times):.1f}"]
        )
    return [("h2", "Training time per method"), ("table", table)]


@register_section("failures")
def _failures(res: Results) -> list:
    if not res.failures:
        return []
    table = Table(["cell", "reason"], [[f["cell"], f["reason"]] for f in res.failures])
    return [("h2", "Failed cells"), ("table", table)]


@register_section("grid")
def _grid(res: Results) -> list:
    import yaml

    text = yaml.safe_dump(res.meta["grid"], sort_keys=False, allow_unicode=True).rstrip()
    return [("h2", "The grid"), ("code", text)]


# ----------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_bits(res: Results, pivot) -> None:
    from qatlab.train.plots import _save

    _, widths, series = pivot
    widths = widths[::-1]  # narrow to wide, float last
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(widths)))
    for label, line in series.items():
        pts = [(i, line[w][0] * 100) for i, w in enumerate(widths) if w in line]
        if pts:
            style = "--" if all(line[w][1] for w in widths if w in line and w != "float") else "-"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
    ax.set_xticks(xs, widths)
    ax.set_xlabel("bit width (dashed: float training + PTQ)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, res.out / "acc_vs_bits.png")
    plt.close(fig)


def _plot_curves(res: Results) -> None:
    """Validation accuracy per epoch (mean over seeds), one panel per bit width if any."""
    from qatlab.train.plots import _save

    plt = _pyplot()
    keys = res.group_keys()
    split = "bits" in keys
    groups = _groups(res)
    panels = sorted({k[keys.index("bits")] for k, _ in groups}, key=bits_order) if split else [""]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels) + 1, 3.6), sharey=True, squeeze=False
    )
    for key, members in groups:
        panel = key[keys.index("bits")] if split else ""
        ax = axes[0][panels.index(panel)]
        curves = [
            {r["epoch"]: r["val_acc"] for r in res.records(m["cell"]) if "val_acc" in r}
            for m in members
        ]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if epochs:
            ys = [sum(c[e] for c in curves) / len(curves) * 100 for e in epochs]
            label = " ".join(str(v) for k, v in zip(keys, key, strict=True) if k != "bits")
            ax.plot(epochs, ys, marker=".", label=label or "all")
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation accuracy (%), mean over seeds")
    _save(fig, res.out / "curves.png")
    plt.close(fig)


def _plot_logged(
    res: Results,
    metric: str,
    name: str,
    ylabel: str,
    *,
    scale: float = 100.0,
    by_arm: bool = False,
    arms: dict[str, list[str]] | None = None,
    log: bool = False,
) -> bool:
    """A step-logged statistic over training (times ``scale``), mean over seeds: one panel per
    setting (the labels other than the method, e.g. the bit width), one line per method with
    its own colour, line style and marker (identical curves stay visible), one legend beside
    the panels. ``by_arm``: one panel, one line per arm (the rows' ``arm``); ``arms``: only
    the groups whose labels take one of the listed values; ``log``: a log y axis."""
    from qatlab.train.plots import _save

    keys = res.group_keys()
    split = keys.index("method") if "method" in keys and not by_arm else None
    panels: dict[tuple, list[tuple[str, list[int], list[float]]]] = {}
    for key, members in _groups(res):
        if any(str(members[0].get(c)) not in v for c, v in (arms or {}).items()):
            continue
        curves = [
            {r["step"]: r[metric] for r in res.records(m["cell"]) if is_number(r.get(metric))}
            for m in members
        ]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        ys = [sum(c[s] for c in curves) / len(curves) * scale for s in steps]
        if by_arm:
            panel, label = (), str(members[0].get("arm") or " ".join(map(str, key)))
        elif split is None:
            panel, label = (), " ".join(map(str, key))
        else:
            panel, label = key[:split] + key[split + 1 :], str(key[split])
        panels.setdefault(panel, []).append((label, steps, ys))
    if not panels:
        return False
    plt = _pyplot()
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols + 1.6, 3.0 * nrows), squeeze=False, sharey=True
    )
    labels = sorted({label for lines in panels.values() for label, _, _ in lines})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*"]
    for ax, (panel, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, steps, ys in lines:
            i = labels.index(label)
            every = max(1, len(steps) // 8)
            ax.plot(
                steps,
                ys,
                label=label,
                color=colors[i % len(colors)],
                linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)],
                markevery=(i % every, every),
                markersize=4,
                linewidth=1.4,
            )
        ax.set_title(" ".join(map(str, panel)) or metric, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.6 * ncols + 1.6), 1))
    _save(fig, res.out / name)
    plt.close(fig)
    return True


def _plot_hist(res: Results) -> bool:
    """The ``oscillation`` measure's frequency histograms at the end of training, summed over
    seeds: one panel per setting (the labels other than method), one line per method."""
    from qatlab.train.plots import _save

    rows = [r for r in res.rows if isinstance(r.get("osc_hist"), list)]
    if not rows:
        return False
    follow = {c["name"]: c["follow_ups"] for c in res.cells}
    keys = [k for k in res.group_keys() if k != "method"]
    panels: dict[tuple, dict[str, list[float]]] = {}
    hist_max = 0.1
    for r in rows:
        spec = next((f for f in follow.get(r["cell"], []) if f.get("measure") == "oscillation"), {})
        hist_max = spec.get("hist_max", hist_max)
        per = panels.setdefault(tuple(r.get(k, "–") for k in keys), {})
        method = str(r.get("method", r["method_name"]))
        total = per.get(method, [0.0] * len(r["osc_hist"]))
        per[method] = [a + b for a, b in zip(total, r["osc_hist"], strict=True)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, per) in zip(axes[0], panels.items(), strict=True):
        for method, counts in per.items():
            width = hist_max / len(counts)
            centers = [(i + 0.5) * width for i in range(len(counts))]
            ax.plot(centers, [max(c, 0.5) for c in counts], marker="o", ms=3, label=method)
        ax.set_yscale("log")
        ax.set_title(" ".join(map(str, key)) or "all", fontsize=9)
        ax.set_xlabel(f"oscillation frequency f (histogram over 0..{hist_max:g})")
    axes[0][0].set_ylabel("weights (all seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, res.out / "oscillation_hist.png")
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- rendering
def build_report(out: str | Path) -> str:
    """(Re)write ``report.md``, ``report.html``, ``results.csv``, ``results.jsonl`` and the
    plots of comparison folder ``out`` from its stored results; return the headline table
    (Markdown): the table by bit width if there is one, else the results table."""
    from qatlab.train.metrics import write_csv, write_text

    res = load_results(out)
    extra = [EXTRA_SECTIONS[n] for n in res.meta["grid"].get("sections") or []]
    blocks = [b for _, fn in SECTIONS[:1] for b in fn(res)]  # the header
    blocks += [b for fn in [*extra, *(fn for _, fn in SECTIONS[1:])] for b in fn(res)]
    write_text(res.out / "report.md", render_markdown(blocks))
    write_text(res.out / "report.html", render_html(blocks, res.out, res.meta["grid_name"]))
    write_text(
        res.out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in res.rows)
    )
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in res.rows]
    write_csv(res.out / "results.csv", flat)
    tables = [b[1] for b in blocks if b[0] == "table"]
    return tables[0].markdown() if tables else ""


def render_markdown(blocks: list) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(block[1].markdown())
        elif kind == "img":
            parts.append(f"![{block[2]}]({block[1]})")
        elif kind == "code":
            parts.append(f"```yaml\n{block[1]}\n```")
        # "details" (a collapsed table) is HTML only: report.md stays short
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list, folder: Path, title: str) -> str:
    """One self-contained page: the images are embedded as base64 PNG."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(block[1]))
            text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            body.append(block[1].html())
        elif kind == "details":
            summary = html.escape(block[1])
            body.append(f"<details><summary>{summary}</summary>{block[2].html()}</details>")
        elif kind == "img":
            path = folder / block[1]
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                alt = html.escape(block[2])
                body.append(f'<img alt="{alt}" src="data:image/png;base64,{data}">')
        elif kind == "code":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
