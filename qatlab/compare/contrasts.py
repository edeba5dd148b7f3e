"""Paired contrasts of a comparison: each arm against its control arm, seed by seed.

A grid lists them under ``contrasts:``; each item names a ``metric`` (a result column, or a
list of them) and a ``control``: label values (a label column such as ``method``, ``bits``,
``model``, or ``stage``) that replace an arm's own values to find its control arm, the arm with
the same other labels (arms of a stage with other axes match on the columns both have)::

    contrasts:
      - {metric: test_acc, control: {method: qat}}      # every other method vs qat, per setting
      - {metric: [xbf_2, xb_2], control: {stage: reg, lam: 0}, arms: {stage: [const, uniform]}}

``control_metric`` (optional: one column, or a list with one per metric) reads the control's
value from another column: ``{metric: corr_mean, control: {bits: float}, control_metric:
"ptqcorr_{bits}"}`` pairs each QAT model's corrupted accuracy with the float model's after
post-training quantization at the arm's own width. Metrics, control metrics and control values
may be templates filled with the arm's labels (an arm without one of their columns is not part
of the contrast): ``{metric: "xbf_{target_bits}", control: {stage: qat, bits:
"W{target_bits}A-"}, control_metric: xbf_trained}`` pairs a model trained for target width t
and quantized after training to t bits with the QAT model trained at t bits, as trained.
``control: self`` pairs two columns of each arm's own rows (``control_metric`` required):
``{metric: acc_bn, control: self, control_metric: test_acc}`` is what BatchNorm re-estimation
changes in each arm, seed by seed (use ``arms`` to pick the arms).
``pool`` (optional, label columns) merges the arms that differ only in those columns into one
line whose pairs are (their values, seed): ``pool: [stage, model, lr]`` gives one line per bit
width over every data set, model, learning rate and seed.
``arms`` (optional) keeps only the arms whose labels take one of the listed values; ``tie``
(default 0) is the tolerance of a tie, ``|d| <= tie`` in the metric's own units (0.001 = one
test example in 1000); ``better`` (``max``/``min``, default the metric's registered column,
else ``max``) says which sign of the difference is "better". The per-seed differences
``d_s = metric(arm, s) - metric(control, s)`` over the seeds both arms finished give the mean,
the 95% Student-t interval, wins/ties/losses and a verdict
(:func:`qatlab.measure.stats.paired_differences`); seeds only one arm has are counted and
ignored. The report shows one table per contrast and writes ``contrasts.csv`` (one line per arm)
and ``contrasts.json`` (with every pair's cells and values) into the comparison folder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from qatlab.errors import ConfigError
from qatlab.measure.registry import column_for, is_number
from qatlab.measure.stats import Paired, paired_differences

CONTRAST_KEYS = ("metric", "control", "arms", "tie", "better", "control_metric", "pool")
LEVEL = 0.95


@dataclass(frozen=True)
class Contrast:
    """One ``contrasts:`` item, validated (values as the label strings of the cells)."""

    metrics: tuple[str, ...]  # each may be a template over the arm's labels: "xbf_{target_bits}"
    control: dict[str, str]  # values may be templates too: {bits: "W{target_bits}A-"}
    arms: dict[str, list[str]] = field(default_factory=dict)
    tie: float = 0.0
    better: str | None = None  # None: the metric's registered column says, else "max"
    control_metric: tuple[str, ...] | None = None  # one per metric, e.g. ("ptqcorr_{bits}",)
    pool: tuple[str, ...] = ()  # label columns whose arms are merged (pairs: their values, seed)
    own: bool = False  # control: self, each arm against another column of its own rows

    def control_key(self, metric: str, arm_labels: dict[str, str]) -> str:
        """The column the control's value is read from, for an arm with ``arm_labels``
        (``metric``: one of :attr:`metrics`, as written)."""
        if self.control_metric is None:
            return metric.format(**arm_labels)
        return self.control_metric[self.metrics.index(metric)].format(**arm_labels)

    def filled(self, arm_labels: dict[str, str]) -> dict[str, str] | None:
        """The control values for an arm with ``arm_labels`` (templates filled); None when the
        arm lacks a column that a template of this contrast names."""
        texts = [*self.metrics, *self.control.values(), *(self.control_metric or ())]
        if any(f not in arm_labels for t in texts for f in _fields(t)):
            return None
        return {k: v.format(**arm_labels) for k, v in self.control.items()}

    def describe(self) -> str:
        if self.own:
            return f"the same arm's {', '.join(dict.fromkeys(self.control_metric or ()))}"
        return ", ".join(f"{k}={v}" for k, v in self.control.items())


# ----------------------------------------------------------------------------- the grid key
def parse_contrasts(data: Any, values: dict[str, list[str]]) -> list[Contrast]:
    """The grid's ``contrasts:`` list, checked against the cells' label values ``values``
    (column -> the values its cells take; ``stage`` included); a mistake is one ConfigError."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(
            f"contrasts must be a list of {{metric: ..., control: {{label: value}}}}, got {data!r}"
        )
    return [_parse_one(item, i, values) for i, item in enumerate(data)]


def _parse_one(item: Any, i: int, values: dict[str, list[str]]) -> Contrast:
    where = f"contrasts[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(
            f"{where} must be a mapping {{metric: ..., control: {{label: value}}}}, got {item!r}"
        )
    for key in item:
        if key not in CONTRAST_KEYS:
            hint = difflib.get_close_matches(str(key), CONTRAST_KEYS, n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown key '{key}' in {where}{tip}; valid keys: {', '.join(CONTRAST_KEYS)}"
            )
    metric = item.get("metric")
    metrics = metric if isinstance(metric, list) else [metric]
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(
            f"{where} needs metric: a result column such as test_acc (or a list), got {metric!r}"
        )
    control = item.get("control")
    own = control == "self"
    if own:
        if item.get("control_metric") is None:
            raise ConfigError(
                f"{where}: control: self pairs two columns of each arm and needs control_metric"
            )
        control = {}
    elif not isinstance(control, dict) or not control:
        raise ConfigError(f"{where} needs control: {{label: value}}, e.g. {{method: qat}}")
    for text in metrics:
        _check_template(text, f"{where} metric", values)
    control = {str(k): _value(v, f"{where} control", k, values) for k, v in control.items()}
    arms = parse_arms(item.get("arms"), f"{where} arms", values)
    tie = item.get("tie", 0.0)
    if not is_number(tie) or tie < 0:
        raise ConfigError(f"{where} tie must be a number >= 0 (metric units), got {tie!r}")
    better = item.get("better")
    if better not in (None, "max", "min"):
        raise ConfigError(f"{where} better must be max or min, got {better!r}")
    control_metric = item.get("control_metric")
    if control_metric is not None:
        given = control_metric if isinstance(control_metric, list) else [control_metric]
        if not all(isinstance(c, str) and c for c in given) or len(given) != len(metrics):
            raise ConfigError(
                f"{where} control_metric must be one column name per metric (a template such "
                f"as 'ptqcorr_{{bits}}'; {len(metrics)} metric(s)), got {control_metric!r}"
            )
        for text in given:
            _check_template(text, f"{where} control_metric", values)
        control_metric = tuple(given)
    pool = item.get("pool") or []
    pool = pool if isinstance(pool, list) else [pool]
    for column in pool:
        if column not in values or column in control:
            raise ConfigError(
                f"{where} pool: {column!r} must be a label column other than the control's "
                f"(columns: {', '.join(values)})"
            )
    return Contrast(
        tuple(metrics), control, arms, float(tie), better, control_metric, tuple(pool), own
    )


def parse_arms(arms: Any, where: str, values: dict[str, list[str]]) -> dict[str, list[str]]:
    """An ``arms: {label: [values]}`` filter (a contrast's or a plot's), checked against the
    cells' label ``values`` and returned as label strings (``lam: 0`` -> ``"0.0"``)."""
    arms = arms or {}
    if not isinstance(arms, dict):
        raise ConfigError(f"{where} must be a mapping {{label: [values]}}, got {arms!r}")
    return {
        str(k): [_value(v, where, k, values) for v in (vs if isinstance(vs, list) else [vs])]
        for k, vs in arms.items()
    }


def _fields(text: str) -> list[str]:
    """The ``{column}`` fields of a template (none for a plain name)."""
    import string

    return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]


def _check_template(text: str, where: str, values: dict[str, list[str]]) -> None:
    try:
        text.format(**dict.fromkeys(values, ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{where} {text!r}: {{{exc}}} is not a label column (columns: {', '.join(values)})"
        ) from None


def _value(value: Any, where: str, column: Any, values: dict[str, list[str]]) -> str:
    if column not in values:
        raise ConfigError(
            f"{where}: {column!r} is not a label column of this grid (columns: {', '.join(values)})"
        )
    if isinstance(value, str) and _fields(value):  # a template: checked when filled
        _check_template(value, where, values)
        return value
    label = "none" if value is None else str(value)
    if label not in values[column] and is_number(value):  # lam: 1 for the label "1.0"
        label = next((v for v in values[column] if _as_float(v) == value), label)
    if label not in values[column]:
        raise ConfigError(
            f"{where}: no cell has {column}={label!r} ({column} values: "
            f"{', '.join(map(repr, values[column]))})"
        )
    return label


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def label_values(cells: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Column -> the values the cells take, in grid order (``stage`` first)."""
    out: dict[str, list[str]] = {"stage": []}
    for cell in cells:
        for column, value in [("stage", cell["stage"]), *cell["labels"].items()]:
            out.setdefault(column, [])
            if value not in out[column]:
                out[column].append(value)
    return out


# ----------------------------------------------------------------------------- arms and pairs
Ident = tuple[tuple[str, str], ...]  # ((column, value), ...): stage first, then the labels


@dataclass
class Arm:
    """The cells of one setting of the grid (every seed): its labels and each seed's row."""

    ident: Ident
    name: str
    cells: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> result row

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.ident)


def arms_of(res: Any) -> list[Arm]:
    """The comparison's arms in grid order, with their finished rows by seed. An arm is named
    by its rows' ``arm`` column when they have one, else by its label values joined."""
    rows = {r["cell"]: r for r in res.rows}
    arms: dict[Ident, Arm] = {}
    for cell in res.cells:
        ident = (("stage", cell["stage"]), *cell["labels"].items())
        arm = arms.get(ident)
        if arm is None:
            arm = arms[ident] = Arm(ident, " ".join(v for _, v in ident if v != ""))
        row = rows.get(cell["name"])
        if row is not None:
            arm.cells[cell["seed"]] = row
            if isinstance(row.get("arm"), str) and row["arm"]:
                arm.name = row["arm"]
    return list(arms.values())


def control_of(arm: Arm, contrast: Contrast, arms: list[Arm]) -> Arm | str | None:
    """``arm``'s control: the arm with the contrast's control values and ``arm``'s other labels;
    arms of stages with other axes match on the columns both have. None when ``arm`` is not
    part of this contrast (it is a control, is filtered out by ``arms``, or lacks a control
    column and no arm fits); a string says why no control was found."""
    labels = _matching(arm, contrast)
    lacks = any(c not in labels for c in contrast.control)
    if any(arm.labels.get(c) not in allowed for c, allowed in contrast.arms.items()):
        return None
    if contrast.own:
        return arm
    control = contrast.filled(arm.labels)
    if control is None:
        return None
    target = {**labels, **control}
    if target == labels:
        return None
    found = []
    for other in arms:
        have = _matching(other, contrast)
        if other is arm or any(have.get(c) != v for c, v in control.items()):
            continue
        if all(target[c] == v for c, v in have.items() if c in target):
            found.append(other)
    exact = [o for o in found if _matching(o, contrast) == target]
    if exact:
        return exact[0]
    if len(found) == 1:
        return found[0]
    said = ", ".join(f"{k}={v}" for k, v in control.items())
    if not found:
        return None if lacks else f"{arm.name}: no control arm with {said}"
    return f"{arm.name}: {len(found)} arms match {said} ({found[0].name}, ...)"


def _matching(arm: Arm, contrast: Contrast) -> dict[str, str]:
    """The labels an arm is matched on: an ``arm`` label column (an explicit name for each
    setting, unique to it) only when the contrast's control names it."""
    labels = arm.labels
    if "arm" in labels and "arm" not in contrast.control:
        del labels["arm"]
    return labels


@dataclass
class Line:
    """One arm against its control on one metric: the pairs and the statistics."""

    contrast: Contrast
    metric: str
    arm: Arm
    control: Arm
    paired: Paired
    control_metric: str = ""  # the control's column (the metric itself unless a template)
    template: str = ""  # the metric as the contrast writes it (before filling; for pooling)
    values: dict[Any, tuple[Any, Any]] = field(default_factory=dict)  # pair -> (arm, control)

    def __post_init__(self) -> None:
        self.control_metric = self.control_metric or self.metric
        self.template = self.template or self.metric

    @property
    def metric_name(self) -> str:
        same = self.control_metric == self.metric
        return self.metric if same else f"{self.metric} vs {self.control_metric}"

    @property
    def higher_is_better(self) -> bool | None:
        """The contrast's ``better``, else the registered column's (None: a column with no
        better side, such as a training loss, gets ``higher``/``lower``), else True."""
        if self.contrast.better is not None:
            return self.contrast.better == "max"
        entry = column_for(self.metric)
        if entry is None:
            return True
        return None if entry[0].better is None else entry[0].better == "max"

    @property
    def verdict(self) -> str:
        return self.paired.verdict(self.higher_is_better)


def contrast_lines(res: Any, contrast: Contrast) -> tuple[list[Line], list[str]]:
    """Every arm of ``contrast`` against its control, and notes on arms with no control."""
    arms = arms_of(res)
    lines, notes = [], []
    for arm in arms:
        control = control_of(arm, contrast, arms)
        if control is None:
            continue
        if isinstance(control, str):
            notes.append(control)
            continue
        for template in contrast.metrics:
            m, cm = template.format(**arm.labels), contrast.control_key(template, arm.labels)
            a = {s: r.get(m) for s, r in arm.cells.items()}
            c = {s: r.get(cm) for s, r in control.cells.items()}
            paired = paired_differences(a, c, contrast.tie, LEVEL)
            if paired.n or paired.unpaired:  # a metric neither arm has (not measured there)
                pairs = {s: (a[s], c[s]) for s, _ in paired.diffs}
                lines.append(Line(contrast, m, arm, control, paired, cm, template, pairs))
    return (_pooled(lines, contrast) if contrast.pool else lines), notes


def _pooled(lines: list[Line], contrast: Contrast) -> list[Line]:
    """Lines of arms equal but for the ``pool`` columns merged: one line per remaining labels
    and metric (as written: a template's columns may differ between the pooled arms), its
    pairs keyed by (the pooled columns' values, seed)."""
    groups: dict[tuple, list[Line]] = {}
    for line in lines:
        keep = tuple((k, v) for k, v in line.arm.ident if k not in contrast.pool)
        groups.setdefault((line.template, keep), []).append(line)
    out = []
    for (_, keep), group in groups.items():
        metrics = {g.metric for g in group}
        metric = metrics.pop() if len(metrics) == 1 else group[0].template
        pooled = ", ".join(contrast.pool)
        arm = Arm(keep, " ".join(v for _, v in keep if v) + f" (pooled over {pooled})")
        base = tuple((k, v) for k, v in group[0].control.ident if k not in contrast.pool)
        control = Arm(base, " ".join(v for _, v in base if v))
        arm_values, control_values = {}, {}
        for line in group:
            tag = tuple(v for k, v in line.arm.ident if k in contrast.pool)
            for seed, row in line.arm.cells.items():
                arm.cells[(*tag, seed)] = row
                arm_values[(*tag, seed)] = row.get(line.metric)
            for seed, row in line.control.cells.items():
                control.cells[(*tag, seed)] = row
                control_values[(*tag, seed)] = row.get(line.control_metric)
        paired = paired_differences(arm_values, control_values, contrast.tie, LEVEL)
        cm = group[0].control_metric if len({g.control_metric for g in group}) == 1 else ""
        cm = cm or f"{group[0].template} (per arm)"
        pairs = {k: (arm_values[k], control_values[k]) for k, _ in paired.diffs}
        out.append(Line(contrast, metric, arm, control, paired, cm, group[0].template, pairs))
    return out


def scale_of(metric: str, rows: list[dict[str, Any]]) -> tuple[float, str]:
    """How a metric's differences are shown: the registered column's scale, else percentage
    points when every value lies in [0, 1]; and the unit's name."""
    entry = column_for(metric)
    if entry is not None:
        scale = entry[0].scale
    else:
        vals = [r[metric] for r in rows if is_number(r.get(metric))]
        scale = 100.0 if vals and all(0.0 <= v <= 1.0 for v in vals) else 1.0
    return scale, "points" if scale == 100.0 else ""


# ----------------------------------------------------------------------------- the report
Result = tuple[Contrast, list[Line], list[str]]  # a contrast, its lines, notes on missing controls


def contrast_records(results: list[Result]) -> list[dict[str, Any]]:
    """One flat record per arm and contrast, in the metric's own units (``contrasts.csv``)."""
    out = []
    for i, (contrast, lines, _) in enumerate(results):
        for line in lines:
            p = line.paired
            out.append(
                {
                    "contrast": i,
                    "metric": line.metric,
                    "control_metric": line.control_metric,
                    "arm": line.arm.name,
                    "control": line.control.name,
                    **{f"arm_{k}": v for k, v in line.arm.ident},
                    **{f"control_{k}": v for k, v in contrast.control.items()},
                    "n": p.n,
                    "unpaired": p.unpaired,
                    "mean_diff": p.mean,
                    "sd": p.sd,
                    "ci_lo": p.lo,
                    "ci_hi": p.hi,
                    "level": p.level,
                    "tie": p.tie,
                    "wins": p.wins,
                    "ties": p.ties,
                    "losses": p.losses,
                    "higher_is_better": line.higher_is_better,
                    "verdict": line.verdict,
                    "seeds": " ".join(_key(s) for s, _ in p.diffs),
                    "diffs": " ".join(f"{d:.6g}" for _, d in p.diffs),
                }
            )
    return out


def _key(pair: Any) -> str:
    """A pair's name: its seed, or (pooled) the pooled columns' values and the seed."""
    return "/".join(map(str, pair)) if isinstance(pair, tuple) else str(pair)


def contrast_pairs(results: list[Result]) -> list[dict[str, Any]]:
    """``contrasts.json``: each contrast with every arm's pairs (seed, both cells, values)."""
    doc = []
    for contrast, lines, notes in results:
        entries = [
            {
                "metric": line.metric,
                "control_metric": line.control_metric,
                "arm": line.arm.name,
                "control": line.control.name,
                "verdict": line.verdict,
                "unpaired": line.paired.unpaired,
                "pairs": [
                    {
                        "seed": s,
                        "arm_cell": line.arm.cells[s]["cell"],
                        "control_cell": line.control.cells[s]["cell"],
                        "arm_value": line.values[s][0],
                        "control_value": line.values[s][1],
                        "diff": d,
                    }
                    for s, d in line.paired.diffs
                ],
            }
            for line in lines
        ]
        doc.append(
            {
                "metrics": list(contrast.metrics),
                "control": "self" if contrast.own else contrast.control,
                "arms": contrast.arms,
                "tie": contrast.tie,
                "lines": entries,
                "notes": notes,
            }
        )
    return doc


def contrast_blocks(res: Any) -> list:
    """The report section: a table per contrast (numbers also in ``contrasts.csv``/``.json``)."""
    from qatlab.compare.sections import Table
    from qatlab.train.metrics import write_csv, write_json

    contrasts = parse_contrasts(res.meta["grid"].get("contrasts"), label_values(res.cells))
    if not contrasts:
        return []
    results = [(c, *contrast_lines(res, c)) for c in contrasts]
    write_csv(res.out / "contrasts.csv", contrast_records(results))
    write_json(res.out / "contrasts.json", contrast_pairs(results))
    blocks: list = [
        ("h2", "Paired contrasts"),
        (
            "p",
            "Each arm against its control arm (same other labels), seed by seed: mean of the "
            "per-seed differences d = arm − control over the seeds both finished, its 95% "
            "Student-t interval, wins/ties/losses (W/T/L: d > tie, |d| <= tie, d < −tie) and "
            "the verdict: better or worse when the interval excludes 0, else no detectable "
            "difference. Metrics in [0, 1] in percentage points. Numbers in `contrasts.csv`, "
            "each pair's cells in `contrasts.json`.",
        ),
    ]
    for contrast, lines, notes in results:
        scales = {  # a pooled template's own values when no column is registered for it
            x.metric: scale_of(x.metric, [{x.metric: v} for v, _ in x.values.values()])
            if _fields(x.metric)
            else scale_of(x.metric, res.rows)
            for x in lines
        }
        units = {u for _, u in scales.values()}
        unit = units.pop() if len(units) == 1 else ""
        names = [
            m if _fields(m) else (e[1] if (e := column_for(m)) else m) for m in contrast.metrics
        ]
        head = f"{', '.join(names)} against {contrast.describe()}"
        if contrast.tie:
            tie = ", ".join(
                f"{contrast.tie * s:g} {u}".rstrip() for s, u in dict.fromkeys(scales.values())
            )
            head += f"; tie: |d| <= {tie}"
        blocks.append(("p", head))
        diff = "mean diff" + (f" ({unit})" if unit else "")
        headers = ["arm", "control", "metric", "n pairs", diff, "95% CI", "W/T/L", "verdict"]
        table = Table(headers, [_cells(line, scales[line.metric][0]) for line in lines])
        if table.rows:
            blocks.append(("table", table))
        if notes:
            blocks.append(("p", "No control for: " + "; ".join(notes) + "."))
        if not table.rows and not notes:
            blocks.append(("p", "No arm of this grid has that control."))
    return blocks


def _cells(line: Line, scale: float) -> list[str]:
    p = line.paired
    fmt = "{:+.2f}" if scale == 100.0 else "{:+.4g}"
    n = str(p.n) + (f" (+{p.unpaired} unpaired)" if p.unpaired else "")
    mean = "–" if p.mean is None else fmt.format(p.mean * scale)
    if p.n < 2:
        ci = "– (n<2)"
    else:
        ci = f"[{fmt.format(p.lo * scale)}, {fmt.format(p.hi * scale)}]"
    wtl = f"{p.wins}/{p.ties}/{p.losses}"
    return [line.arm.name, line.control.name, line.metric_name, n, mean, ci, wtl, line.verdict]
