"""Comparison reports (Markdown, HTML, CSV/JSONL and plots from stored results), and the
older helpers that aggregate rows over seeds and print them as markdown."""

from __future__ import annotations

import base64
import html
import json
import os
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
    """What a comparison folder holds: marker, cells, finished rows, failures, logs.

    ``out`` is where the report's files are written; the per-cell logged records are read
    from ``source`` (a run folder's ``cells/<cell>/metrics.jsonl``) or, for a published folder
    (``qatlab report RUN --page``), from the compact copy ``logs`` it keeps. With ``reads``
    set, :meth:`records` notes which keys of which records the sections read (publishing
    keeps only those)."""

    out: Path
    meta: dict
    cells: list[dict]
    label_columns: list[str]
    rows: list[dict]
    failures: list[dict]
    source: Path | None = None
    logs: dict[str, list[dict]] | None = None
    reads: dict[str, list[set[str]]] | None = None
    published: dict | None = None  # a published folder's PUBLISHED document

    def records(self, cell: str) -> list[dict]:
        """The logged records (``metrics.jsonl``) of ``cell``."""
        records = self.records_plain(cell)
        if self.reads is None:
            return records
        seen = self.reads.setdefault(cell, [])
        seen += [set() for _ in range(len(records) - len(seen))]
        return [_Noted(r, s) for r, s in zip(records, seen, strict=False)]

    def records_plain(self, cell: str) -> list[dict]:
        """:meth:`records` without noting what is read."""
        from qatlab.train.metrics import read_jsonl

        if self.logs is not None:
            return self.logs.get(cell, [])
        return read_jsonl(Path(self.source or self.out) / "cells" / cell / "metrics.jsonl")

    def events(self) -> list[dict]:
        """The driver's start/finish events (``events.jsonl``) of this comparison's cells."""
        from qatlab.train.metrics import read_jsonl

        names = {c["name"] for c in self.cells}
        events = read_jsonl(Path(self.source or self.out) / "events.jsonl")
        return [e for e in events if e.get("cell") in names]

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(c["stage"] for c in self.cells))

    def stage_labels(self) -> dict[str, str]:
        """Stage -> its ``label:`` in the grid (the first part of its arms' names), for the
        stages that have one."""
        stages = (self.meta.get("grid") or {}).get("stages") or []
        return {
            str(s["name"]): str(s["label"])
            for s in stages
            if isinstance(s, dict) and s.get("name") and s.get("label")
        }

    def group_keys(self) -> list[str]:
        """The columns that name a row of the tables (seed excluded: it is aggregated)."""
        return (["stage"] if len(self.stages) > 1 else []) + self.label_columns


class _Noted(dict):
    """A logged record that notes the keys read from it (present ones: ``r[k]``, ``r.get(k)``,
    ``k in r``) into ``seen``."""

    def __init__(self, record: dict, seen: set[str]) -> None:
        super().__init__(record)
        self._seen = seen

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self._seen.add(key)
        return value

    def get(self, key, default=None):
        if super().__contains__(key):
            self._seen.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        found = super().__contains__(key)
        if found:
            self._seen.add(key)
        return found


def load_results(out: str | Path) -> Results:
    """Read a comparison folder, or a folder published from one (no training, no model
    loading)."""
    from qatlab.compare.engine import KIND, MARKER
    from qatlab.errors import ConfigError
    from qatlab.train.metrics import read_jsonl

    out = Path(out)
    try:
        meta = json.loads((out / MARKER).read_text())
        cells_doc = json.loads((out / "cells.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{out} is not a qatlab comparison folder (no {MARKER})") from None
    if meta.get("kind") != KIND:
        raise ConfigError(f"{out} is not a qatlab comparison folder")
    cells, columns = cells_doc["cells"], cells_doc["label_columns"]
    published = _published_doc(out)
    if published is not None:
        names = {c["name"] for c in cells}
        rows = [r for r in read_jsonl(out / "results.jsonl") if r.get("cell") in names]
        failures = read_jsonl(out / FAILURES)
        logs: dict[str, list[dict]] = {}
        for cell, record in _read_logs(out):
            logs.setdefault(cell, []).append(record)
        return Results(out, meta, cells, columns, rows, failures, logs=logs, published=published)
    rows, failures = [], []
    for cell in cells:
        folder = out / "cells" / cell["name"]
        if (folder / "result.json").is_file():
            rows.append(json.loads((folder / "result.json").read_text()))
        elif (folder / "failed.json").is_file():
            failures.append(json.loads((folder / "failed.json").read_text()))
    return Results(out, meta, cells, columns, rows, failures, source=out)


# ----------------------------------------------------------------------------- aggregation
def _groups(res: Results, rows: list[dict] | None = None) -> list[tuple[tuple, list[dict]]]:
    keys = res.group_keys()
    order: dict[tuple, list[dict]] = {}
    for cell in res.cells:  # grid order, even for groups with no finished cell yet
        order.setdefault(_cell_key(res, cell, keys), [])
    for row in res.rows if rows is None else rows:
        order.setdefault(_row_key(res, row, keys), []).append(row)
    return [(k, v) for k, v in order.items() if v]


def _cell_key(res: Results, cell: dict, keys: list[str]) -> tuple:
    """The values of ``keys`` that name ``cell``'s row in the tables; a stage with a
    ``label:`` is named by it (the arms' label, not the stage's name)."""
    labels = res.stage_labels()
    return tuple(
        labels.get(cell["stage"], cell["stage"]) if k == "stage" else cell["labels"].get(k, "–")
        for k in keys
    )


def _row_key(res: Results, row: dict, keys: list[str]) -> tuple:
    """:func:`_cell_key` of a result row."""
    labels = res.stage_labels()
    values = [row.get(k, "–") for k in keys]
    return tuple(labels.get(v, v) if k == "stage" else v for k, v in zip(keys, values, strict=True))


def _headers(res: Results, keys: list[str]) -> list[str]:
    """Column headers of the group keys: ``stage`` is ``arm`` when stages carry labels."""
    arm = bool(res.stage_labels())
    return ["arm" if k == "stage" and arm else k for k in keys]


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
    headers = _headers(res, gkeys) + [column_for(k)[1] for k in keys] + ["n"]
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
        order.setdefault(_cell_key(res, cell, others), {})
    for row in res.rows:
        per = order.setdefault(_row_key(res, row, others), {})
        per.setdefault(_bits_of(row), []).append(row.get("test_acc"))
        if _bits_of(row) == "float":
            for w in widths:
                if f"ptq_{w}" in row:
                    per.setdefault(f"ptq:{w}", []).append(row[f"ptq_{w}"])
    with_desc = "method" in others
    headers = _headers(res, others) + (["what it is"] if with_desc else []) + widths
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
        (
            "p",
            "`PTQ Wb, weights only`: the weights rounded to b bits (max-abs step, restricted "
            "grid), activations left in float (Wenshøj et al.'s cross-bit protocol); `PTQ WbAb` "
            "columns quantize both. `trained`: a QAT model with its own quantizers.",
        ),
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
        per = panels.setdefault(_row_key(res, r, keys), {})
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
    (Markdown): the table by bit width if there is one, else the results table. A published
    folder (:func:`publish`) is rebuilt instead: its page and its files."""
    from qatlab.train.metrics import write_text

    res = load_results(out)
    if res.published is not None:
        return _headline(_rebuild(res))
    blocks = [b for _, fn in SECTIONS[:1] for b in fn(res)] + _section_blocks(res)  # header
    write_text(res.out / "report.md", render_markdown(blocks))
    write_text(res.out / "report.html", render_html(blocks, res.out, res.meta["grid_name"]))
    _write_rows(res)
    return _headline(blocks)


def _headline(blocks: list) -> str:
    tables = [b[1] for b in blocks if b[0] == "table"]
    return tables[0].markdown() if tables else ""


def _section_blocks(res: Results) -> list:
    """Every section after the header: the grid's ``sections:``, then the default ones (they
    write their plots, and contrasts.csv/.json, into ``res.out``)."""
    extra = [EXTRA_SECTIONS[n] for n in res.meta["grid"].get("sections") or []]
    return [b for fn in [*extra, *(fn for _, fn in SECTIONS[1:])] for b in fn(res)]


def _write_rows(res: Results) -> None:
    """``results.jsonl`` (each row as stored, keys in its own order) and ``results.csv``."""
    from qatlab.train.metrics import write_csv, write_text

    write_text(res.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in res.rows))
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in res.rows]
    write_csv(res.out / "results.csv", flat)


def render_markdown(blocks: list, prefix: str = "") -> str:
    """Markdown of ``blocks``; ``prefix`` goes before every relative image and link path (a
    page beside its folder: ``NAME/curves.png``)."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(_relink(block[1], prefix))
        elif kind == "table":
            parts.append(block[1].markdown())
        elif kind == "img":
            parts.append(f"![{block[2]}]({prefix}{block[1]})")
        elif kind == "code":
            lang = block[2] if len(block) > 2 else "yaml"
            parts.append(f"```{lang}\n{block[1]}\n```")
        elif kind == "md":  # verbatim Markdown (a page's notes.md)
            parts.append(block[1].strip("\n"))
        # "details" (a collapsed table) is HTML only: report.md stays short
    return "\n\n".join(parts) + "\n"


def _relink(text: str, prefix: str) -> str:
    if not prefix:
        return text
    return re.sub(
        r"\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:|/|#)([^)\s]+)\)", lambda m: f"]({prefix}{m[1]})", text
    )


# ----------------------------------------------------------------------------- publishing
# ``qatlab report RUN --page docs/results/NAME.md`` writes the page and docs/results/NAME/: the
# stored results the page is made of (marker, cells, rows, failures, selections, the driver's
# events, the logged records the sections read) and the report's files (results.csv/.jsonl,
# contrasts.csv/.json, PNGs). ``qatlab report docs/results/NAME`` rebuilds both from the folder
# alone, byte for byte (PNGs: on the same matplotlib; they are checked at publishing time).
PUBLISHED = "published.json"  # the publish marker: page path, title, regenerate command
PUBLISH_KIND = "qatlab published comparison"
NOTES = "notes.md"  # hand-written, copied verbatim into the page after its header
FAILURES = "failures.jsonl"
LOGS = "logs.jsonl"  # [cell, record] per line, the keys the sections read; gzipped if large
LOGS_GZ = LOGS + ".gz"
GZIP_ABOVE = 200_000  # bytes
RUNS = "runs/compare"  # where the regenerate command puts the run folder
INPUTS = ("comparison.json", "cells.json", "selections.json", "events.jsonl", "results.jsonl")
INPUTS += (FAILURES, LOGS, LOGS_GZ, PUBLISHED, NOTES, "grid.yaml")


def _published_doc(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / PUBLISHED).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == PUBLISH_KIND else None


def _read_logs(folder: Path) -> list[tuple[str, dict]]:
    import gzip

    if (folder / LOGS_GZ).is_file():
        text = gzip.decompress((folder / LOGS_GZ).read_bytes()).decode()
    elif (folder / LOGS).is_file():
        text = (folder / LOGS).read_text()
    else:
        return []
    return [tuple(json.loads(line)) for line in text.splitlines() if line]


def publish(run: str | Path, page: str | Path, title: str | None = None) -> Path:
    """Publish comparison folder ``run`` as ``page`` (``docs/results/NAME.md``) and its folder
    ``docs/results/NAME/``; return the page's path. The folder's ``notes.md`` (if any) is kept
    and copied into the page; everything else in it is rewritten. Checked before it is moved
    in place: the folder rebuilds the same page and files on its own."""
    import shutil
    import tempfile

    from qatlab.errors import ConfigError
    from qatlab.train.metrics import current_umask

    run, page = Path(run), Path(page)
    if page.suffix != ".md":
        raise ConfigError(f"--page must be a Markdown file (docs/results/NAME.md), got {page}")
    folder = page.with_suffix("")
    res = load_results(run)
    if res.published is not None:
        raise ConfigError(f"{run} is a published folder; rebuild it with: qatlab report {run}")
    if folder.exists():
        own = _published_doc(folder) is not None
        others = [p.name for p in folder.iterdir() if p.name != NOTES] if folder.is_dir() else [0]
        if not own and others:
            raise ConfigError(
                f"{folder} exists and is not a published comparison folder (only {NOTES} may be "
                "there before the first publish); choose another --page"
            )
    pub = _publish_doc(res, page, folder, title)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.publish."))
    os.chmod(stage, 0o777 & ~current_umask())  # a folder as mkdir makes it, not mkdtemp's 0o700
    try:
        _stage_inputs(res, run, folder, stage, pub)
        res.out, res.reads = stage, {}
        text, _ = _published_files(res, pub)
        records = _noted_records(res)
        _write_logs(stage, records)
        if not _same_rebuild(stage, text):  # a section read records in a way not noted
            _write_logs(stage, _full_records(res))
            if not _same_rebuild(stage, text):
                raise ConfigError(
                    f"the report of {run} does not rebuild identically from its published data "
                    "(a section reads something publishing does not keep); nothing written"
                )
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    _write_page(folder, pub, text)
    return Path(os.path.normpath(folder / pub["page"]))


def _publish_doc(res: Results, page: Path, folder: Path, title: str | None) -> dict:
    """The publish marker: how the page is named and regenerated (fixed at publishing, so a
    copy of the folder elsewhere rebuilds the very same page)."""
    from qatlab.compare.spec import presets, read_grid

    shown = _shown(page)
    source = str(res.meta.get("source") or "")
    if Path(source).parent.name == "presets" and Path(source).stem in presets():
        source = Path(source).stem  # a preset's file, named by its path
    grid_arg = source
    same = False
    if source in presets():
        same = _plain(read_grid(source)) == _plain(res.meta["grid"])
    if not same:  # a grid file, or a preset with --set: the grid is kept beside the page
        grid_arg = f"{_shown(folder)}/grid.yaml"
    name = folder.name
    return {
        "kind": PUBLISH_KIND,
        "page": os.path.relpath(page, folder),
        "page_shown": shown,
        "title": title or res.meta["grid_name"],
        "grid": grid_arg,
        "grid_file": not same,
        "run": f"{RUNS}/{name}",
    }


def _plain(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _shown(path: Path) -> str:
    """A path as the page shows it: relative to the working directory when inside it."""
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            pass
    return os.path.normpath(path)


def _stage_inputs(res: Results, run: Path, folder: Path, stage: Path, pub: dict) -> None:
    """Copy the stored results the page is made of into ``stage``."""
    import yaml

    from qatlab.compare.engine import MARKER
    from qatlab.train.metrics import write_json, write_text

    for name in (MARKER, "cells.json", "selections.json"):
        if (run / name).is_file():
            (stage / name).write_bytes((run / name).read_bytes())
    write_text(stage / "events.jsonl", "".join(json.dumps(e) + "\n" for e in res.events()))
    failures = [{"cell": f.get("cell"), "reason": f.get("reason")} for f in res.failures]
    write_text(stage / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    if (folder / NOTES).is_file():
        (stage / NOTES).write_bytes((folder / NOTES).read_bytes())
    if pub["grid_file"]:
        grid = {"name": res.meta["grid_name"], **res.meta["grid"]}
        write_text(stage / "grid.yaml", yaml.safe_dump(grid, sort_keys=False, allow_unicode=True))
    write_json(stage / PUBLISHED, pub)


def _published_files(res: Results, pub: dict) -> tuple[str, list]:
    """Write the report's files of a published folder (``res.out``); return the page's text
    and the section blocks."""
    blocks = _section_blocks(res)
    _write_rows(res)
    notes = res.out / NOTES
    head = _page_header(res, pub)
    if notes.is_file():
        head.append(("md", notes.read_text()))
    prefix = Path(pub["page_shown"]).stem + "/"
    return render_markdown(head + blocks, prefix), blocks


def _write_page(folder: Path, pub: dict, text: str) -> None:
    from qatlab.train.metrics import write_text

    write_text(folder / pub["page"], text)


def _rebuild(res: Results) -> list:
    """Rebuild a published folder's files and its page; return the section blocks."""
    text, blocks = _published_files(res, res.published)
    _write_page(res.out, res.published, text)
    return blocks


def _noted_records(res: Results) -> list[tuple[str, dict]]:
    """The logged records' keys the sections read, per cell (records with none left out)."""
    out = []
    for cell in (c["name"] for c in res.cells):
        seen = (res.reads or {}).get(cell) or []
        if not seen:
            continue
        for record, keys in zip(res.records_plain(cell), seen, strict=False):
            if keys:
                out.append((cell, {k: v for k, v in record.items() if k in keys}))
    return out


def _full_records(res: Results) -> list[tuple[str, dict]]:
    """Every record of every cell whose records a section read (the fallback)."""
    return [
        (c["name"], r)
        for c in res.cells
        if (res.reads or {}).get(c["name"])
        for r in res.records_plain(c["name"])
    ]


def _write_logs(folder: Path, records: list[tuple[str, dict]]) -> None:
    import gzip

    from qatlab.train.metrics import atomic_write

    data = "".join(json.dumps([cell, r]) + "\n" for cell, r in records).encode()
    for name in (LOGS, LOGS_GZ):
        (folder / name).unlink(missing_ok=True)
    if len(data) > GZIP_ABOVE:
        atomic_write(folder / LOGS_GZ, gzip.compress(data, compresslevel=9, mtime=0))
    elif records:
        atomic_write(folder / LOGS, data)


def _same_rebuild(stage: Path, text: str) -> bool:
    """Whether a copy of the published folder ``stage`` alone (inputs only) rebuilds the same
    page and every file of the folder."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / stage.name
        copy.mkdir()
        for path in stage.iterdir():
            if path.name in INPUTS:
                shutil.copy2(path, copy / path.name)
        res = load_results(copy)
        _rebuild(res)
        if (copy / res.published["page"]).read_text() != text:
            return False
        names = {p.name for p in stage.iterdir()}
        if names != {p.name for p in copy.iterdir()}:
            return False
        return all((stage / n).read_bytes() == (copy / n).read_bytes() for n in names)


def _page_header(res: Results, pub: dict) -> list:
    """The page's generated header: title, the grid's description, how to regenerate it,
    seeds, cells, dates and times (all from the stored results)."""
    import time

    n, done, failed = len(res.cells), len(res.rows), len(res.failures)
    blocks: list = [("h1", pub["title"])]
    desc = res.meta["grid"].get("description")
    if desc:
        blocks.append(("p", " ".join(str(desc).split())))
    commands = (
        f"qatlab compare {pub['grid']} --out {pub['run']}\n"
        f"qatlab report {pub['run']} --page {pub['page_shown']}"
    )
    folder = Path(pub["page_shown"]).with_suffix("")
    blocks.append(
        (
            "p",
            "Regenerate: the first command trains the cells missing from its folder (all of "
            f"them in a fresh one), the second rewrites this page and `{folder}/` from the "
            f"stored results; `qatlab report {folder}` rebuilds both from the committed folder "
            "alone.",
        )
    )
    blocks.append(("code", commands, "bash"))
    per_stage: dict[str, list[int]] = {}
    for cell in res.cells:
        per_stage.setdefault(cell["stage"], [])
        if cell["seed"] not in per_stage[cell["stage"]]:
            per_stage[cell["stage"]].append(cell["seed"])
    if len({tuple(v) for v in per_stage.values()}) == 1:
        seeds = "seeds " + ", ".join(map(str, next(iter(per_stage.values()))))
    else:
        seeds = "seeds: " + "; ".join(
            f"stage {s} {', '.join(map(str, v))}" for s, v in per_stage.items()
        )
    train_s = sum(r.get("wall_time_s") or 0.0 for r in res.rows)
    facts = (
        f"{n} cells ({done} finished, {failed} failed, {n - done - failed} not run); {seeds}; "
        f"training time summed over the finished cells {_minutes(train_s)}"
    )
    spans = _spans(res)
    if spans:
        first, last = min(s for s, _ in spans), max(e for _, e in spans)

        def day(t: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))

        facts += (
            f"; the finished cells trained from {day(first)} to {day(last)} UTC "
            f"({_minutes(last - first)} wall time)"
        )
    blocks.append(("p", facts + "."))
    links = "Every finished cell's row: [results.csv](results.csv) ([results.jsonl](results.jsonl))"
    if res.meta["grid"].get("contrasts"):
        links += "; the paired contrasts: [contrasts.csv](contrasts.csv)"
    blocks.append(("p", links + "."))
    return blocks


def _spans(res: Results) -> list[tuple[float, float]]:
    """Per finished cell: when its (last) training started and when it last finished, from the
    driver's events."""
    start: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    finished = {r["cell"] for r in res.rows}
    for event in res.events():
        cell, t = event.get("cell"), event.get("time")
        if cell not in finished or not is_number(t):
            continue
        if event.get("event") == "start" and event.get("train", True):
            start[cell] = t
        elif event.get("event") == "done" and cell in start:
            spans[cell] = (start[cell], t)
    return list(spans.values())


def _minutes(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


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
