"""A comparison grid: its YAML form, and its expansion into cells (ordinary training runs).

A grid is a base run config (the nesting of ``qatlab train`` YAML) plus axes over dotted config
keys, seeds, conditional overrides and follow-up measures::

    name: demo
    base: {data: {name: mnist1d}, model: {name: mlp5}, train: {epochs: 4}}
    seeds: [0, 1]
    axes:
      method.name: "*"                 # every registered method
      quant: [{weight_bits: 4, act_bits: 4}, {weight_bits: 2, act_bits: 2}]
    overrides:
      - {when: {method.name: dampen}, set: {method.lambda_max: 0.05}}
    follow_ups:
      - {measure: ptq, bits: [4, 2], when: {quant: null}}

A grid may instead list ``stages`` (each with ``name`` and its own ``set``, ``axes``,
``overrides``, ``follow_ups``); ``init_from: STAGE`` starts each cell from the ``best.pt`` of
the cell of STAGE with the same seed and the same values on the axes both stages have, which
therefore runs first. A method that trains float models only runs once per setting, in float;
a method that needs quantization skips float cells. Everything is checked here, before any
cell runs: each mistake is one :class:`ConfigError` line. ``contrasts`` (report only: each arm
against a control arm, paired by seed) is checked against the cells' labels here too
(:mod:`qatlab.compare.contrasts`).

More keys (issue 21)::

    monitors: [{name: flips, every: 10}]   # logging hooks (qatlab.train.monitors), grid or stage
    plots: [{key: tr, scale: 100, ylabel: "k_t (%)"}]   # per-step plots per arm (mean over seeds)
    stages:
      - name: tune
        seeds: [100, 101]                  # a stage's own seeds (selection seeds)
        label: "SAQ"                       # the arm name's first part (default: the stage name)
        axes:
          method.name: [qat, saq]
          train.lr: {values: [0.001, 0.01], labels: [lr-small, lr-large]}  # labelled values
        select: {axis: train.lr, metric: val_acc, mode: max}
      - name: final
        seeds: [0, 1, 2]
        axes: {method.name: [qat, saq]}
        use: {train.lr: tune}              # the value tune selected for the matching arm
        follow_ups:
          - {measure: accuracy, checkpoint: both}   # best and final_ (last epoch) weights
          - {measure: logged, key: [tr, flip_share_epoch], reduce: [last, max, tail], tail: 0.1}

``select``: per arm of the stage (its labels without the selected axis) the value of ``axis``
whose mean over the stage's seeds of ``metric`` is best (``mode`` max or min; default min for
a loss, else max). Only validation (``val_*``) metrics may select: test numbers never choose.
``pool`` (label columns, as a contrast's) merges the arms that differ only in those columns:
``select: {axis: train.lr, pool: [model, bits]}`` picks one value for every model and width,
the best mean over all their cells (every pooled setting and seed; a default is one number).
``use: {KEY: STAGE}`` sets KEY of each cell to the value STAGE selected for the arm whose
labels agree with the cell's on the columns both have (exactly one arm must match); such a
stage is expanded (with every candidate value, for the checks) now but runs after STAGE
finished. Every cell has an ``arm``: its stage's ``label`` (or name) and its axis labels, one
string; the rows carry it (and ``selected_<column>`` for a used selection). A comparison
folder grows with its grid (more seeds, values, stages, follow-ups): see
:mod:`qatlab.compare.engine`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qatlab.errors import ConfigError
from qatlab.train.config import merge, parse_override, read_yaml, set_dotted

GRID_KEYS = (
    "name",
    "description",
    "base",
    "seeds",
    "axes",
    "overrides",
    "follow_ups",
    "stages",
    "sections",
    "contrasts",
    "monitors",
    "plots",
)
STAGE_KEYS = (
    "name",
    "set",
    "axes",
    "overrides",
    "follow_ups",
    "init_from",
    "seeds",
    "label",
    "select",
    "use",
    "monitors",
)
SELECT_KEYS = ("axis", "metric", "mode", "pool")
PLOT_KEYS = ("key", "scale", "ylabel", "title", "arms", "log")
ALL_METHODS = "*"


@dataclass
class Cell:
    """One training run of a grid and what to measure on it afterwards."""

    name: str
    stage: str
    seed: int
    labels: dict[str, str]  # axis column -> value label, e.g. {"method": "dampen", "bits": "W4A4"}
    config: dict[str, Any]  # the run config (plain dict); out_dir/name filled in by the engine
    follow_ups: list[dict[str, Any]] = field(default_factory=list)
    depends_on: str | None = None  # name of the cell whose best.pt starts this one
    arm: str = ""  # the arm's name: stage label (or name) and axis labels
    # config key -> {"stage": STAGE, "arm": {column: label}}: a value STAGE selects
    uses: dict[str, dict[str, Any]] = field(default_factory=dict)
    selected: dict[str, Any] = field(default_factory=dict)  # the used values, once resolved

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "seed": self.seed,
            "labels": dict(self.labels),
            "config": copy.deepcopy(self.config),
            "follow_ups": copy.deepcopy(self.follow_ups),
            "depends_on": self.depends_on,
            "arm": self.arm,
            "uses": copy.deepcopy(self.uses),
            "selected": copy.deepcopy(self.selected),
        }

    @property
    def pending(self) -> bool:
        """True while a value this cell uses has not been selected yet."""
        return any(key not in self.selected for key in self.uses)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(**data)


@dataclass
class Grid:
    """A parsed, validated grid: its source dict (what the folder marker records) and cells."""

    name: str
    description: str
    source: dict[str, Any]
    cells: list[Cell]
    label_columns: list[str]
    # stage -> {"axis", "column", "metric", "mode"}: the stages that select a value
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Hash of the grid as written (after ``--set``): a folder holds one grid only.
        ``contrasts`` (report only) is left out: adding one to a finished grid reruns nothing."""
        cells = {k: v for k, v in self.source.items() if k != "contrasts"}
        text = json.dumps(cells, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# ----------------------------------------------------------------------------- loading
def presets() -> list[str]:
    """Names of the grids shipped with qatlab (``qatlab compare NAME``)."""
    folder = resources.files("qatlab.compare") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_grid(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The grid dict from a YAML file or a preset name, with ``KEY=VALUE`` overrides applied
    (dotted keys into the grid document, e.g. ``seeds=[0]`` or ``base.train.epochs=1``)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"no grid file at {source}")
        data = read_yaml(path)
    elif str(source) in presets():
        folder = resources.files("qatlab.compare") / "presets"
        import yaml

        data = yaml.safe_load((folder / f"{source}.yaml").read_text()) or {}
    else:
        hint = difflib.get_close_matches(str(source), presets(), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{source!r} is neither a grid file nor a preset{tip}; presets: {', '.join(presets())}"
        )
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return data


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted`` that also walks into lists by index (``stages.0.set.train.epochs``)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"cannot set {key}: no item {part} in {'.'.join(parts[:i])}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"cannot set {key}: no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def load_grid(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Grid:
    """Read and expand a grid; every cell's config is validated before anything runs."""
    data = read_grid(source, overrides)
    default = Path(str(source)).stem
    return expand(data, default_name=default)


def expand(data: dict[str, Any], default_name: str = "comparison") -> Grid:
    """Expand a grid dict into its cells (validated)."""
    if not isinstance(data, dict):
        raise ConfigError("a grid must be a mapping (name, base, seeds, axes, ...)")
    _check_keys(data, GRID_KEYS, "the grid")
    if "stages" in data and "axes" in data:
        raise ConfigError("a grid has either top-level axes or stages, not both")
    name = str(data.get("name") or default_name)
    base = _mapping(data.get("base") or {}, "base")
    seeds = data.get("seeds", [0])
    seeds = _seeds(seeds)
    stages = data.get("stages")
    if stages is None:
        stages = [{"name": "", "axes": data.get("axes") or {}}]
    elif not isinstance(stages, list) or not stages:
        raise ConfigError("stages must be a non-empty list of mappings")
    _check_sections(data.get("sections"))
    check_plots(data.get("plots"))
    top_overrides = _list(data.get("overrides"), "overrides")
    top_follow = _list(data.get("follow_ups"), "follow_ups")
    top_monitors = _monitors(data.get("monitors"), "monitors")

    cells: list[Cell] = []
    columns: list[str] = []
    seen_stages: dict[str, list[Cell]] = {}
    selections: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(stages):
        stage = _mapping(stage, f"stages[{i}]")
        _check_keys(stage, STAGE_KEYS, f"stages[{i}]")
        sname = str(stage.get("name", "") if len(stages) == 1 else stage.get("name") or "")
        if len(stages) > 1 and not sname:
            raise ConfigError(f"stages[{i}] needs a name")
        if sname in seen_stages:
            raise ConfigError(f"stage name {sname!r} is used twice")
        stage_set = copy.deepcopy(_nested(stage.get("set") or {}, "set"))  # not the document's
        stage_base = merge(copy.deepcopy(base), stage_set)
        monitors = top_monitors + _monitors(stage.get("monitors"), f"stage {sname} monitors")
        if monitors:
            set_dotted(stage_base, "train.monitors", monitors)
        axes, axis_labels = _axes_and_labels(_mapping(stage.get("axes") or {}, "axes"))
        overrides = top_overrides + _list(stage.get("overrides"), f"stage {sname} overrides")
        follow = top_follow + _list(stage.get("follow_ups"), f"stage {sname} follow_ups")
        stage_seeds = _seeds(stage["seeds"]) if "seeds" in stage else seeds
        label = stage.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"stage {sname!r}: label must be a non-empty string, got {label!r}")
        parent = stage.get("init_from")
        if parent is not None and parent not in seen_stages:
            raise ConfigError(
                f"stage {sname!r}: init_from {parent!r} is not an earlier stage "
                f"(stages so far: {', '.join(seen_stages) or 'none'})"
            )
        uses = _uses(stage.get("use"), sname, selections, axes)
        extra = (sname, axes, axis_labels, stage_seeds, overrides, follow, label)
        for key, source in uses.items():  # every value the selection may give must be valid
            for value in selections[source]["values"][1:]:
                trial = copy.deepcopy(stage_base)
                _set(trial, key, copy.deepcopy(value))
                _stage_cells(extra[0], trial, *extra[1:])
        for key, source in uses.items():  # placeholder until the selection is made
            _set(stage_base, key, copy.deepcopy(selections[source]["values"][0]))
        stage_cells = _stage_cells(sname, stage_base, *extra[1:])
        for cell in stage_cells:
            for key, source in uses.items():
                cell.uses[key] = {"stage": source, "arm": _select_arm(cell, source, selections)}
        if stage.get("select") is not None:
            selections[sname] = _selection(stage["select"], sname, axes, stage_cells)
        for col in (c for cell in stage_cells for c in cell.labels):
            if col not in columns:
                columns.append(col)
        if parent is not None:
            for cell in stage_cells:
                cell.depends_on = _match(cell, seen_stages[parent], parent).name
        seen_stages[sname] = stage_cells
        cells += stage_cells
    names = [c.name for c in cells]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"two cells of the grid are both named {dup!r}")
    from qatlab.compare.measures import check_follow_up

    for cell in cells:
        for follow_up in cell.follow_ups:
            check_follow_up(follow_up)
    _check_contrasts(data.get("contrasts"), cells)
    if data.get("plots"):  # a plot's arms: label values of these cells
        from qatlab.compare.contrasts import label_values

        check_plots(
            data["plots"], label_values([{"stage": c.stage, "labels": c.labels} for c in cells])
        )
    grid = Grid(name, str(data.get("description") or ""), data, cells, columns)
    grid.selections = {
        k: {key: v for key, v in sel.items() if key not in ("values", "arms")}
        for k, sel in selections.items()
    }
    return grid


def _check_sections(names: Any) -> None:
    """``sections``: extra report sections (registered with ``default=False``) by name."""
    if names is None:
        return
    from qatlab.compare.sections import EXTRA_SECTIONS

    if not isinstance(names, list):
        raise ConfigError(f"sections must be a list of report section names, got {names!r}")
    for name in names:
        if name not in EXTRA_SECTIONS:
            raise ConfigError(
                f"unknown report section {name!r}; available: {', '.join(sorted(EXTRA_SECTIONS))}"
            )


def _check_contrasts(contrasts: Any, cells: list[Cell]) -> None:
    """``contrasts``: paired arm-vs-control tables of the report, checked against the cells."""
    from qatlab.compare.contrasts import label_values, parse_contrasts

    parse_contrasts(
        contrasts, label_values([{"stage": c.stage, "labels": c.labels} for c in cells])
    )


def _stage_cells(
    stage, base, axes, axis_labels, seeds, overrides, follow, stage_label=None
) -> list[Cell]:
    from qatlab import methods
    from qatlab.train.config import RunConfig

    combos: list[dict[str, int]] = [{}]  # axis -> index of its value
    for key, values in axes.items():
        combos = [{**c, key: i} for c in combos for i in range(len(values))]
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in combos:
        config = copy.deepcopy(base)
        for key, index in combo.items():
            _set(config, key, copy.deepcopy(axes[key][index]))
        method = (config.get("method") or {}).get("name", "auto")
        if method not in ("auto", None):
            spec = methods.get_method(str(method))  # unknown method: one line, before anything
            if spec.needs_quant is False and config.get("quant") is not None:
                config["quant"] = None  # float-only methods run once, in float
            if spec.needs_quant is True and config.get("quant") is None:
                continue
        key = json.dumps(config, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        labels = {}
        for k in axes:
            given = axis_labels.get(k)
            labels[_column(k, axes)] = given[combo[k]] if given else _label(config, k)
        arm = _arm(stage, stage_label, labels, {_column(k, axes) for k in axis_labels})
        for seed in seeds:
            cfg = copy.deepcopy(config)
            set_dotted(cfg, "train.seed", seed)
            for rule in overrides:  # after the seed, so a rule may single out one seed
                if _matches(cfg, rule.get("when") or {}):
                    for k, value in _nested(rule.get("set") or {}, "override set").items():
                        _set(cfg, k, copy.deepcopy(value))
            parts = ([stage] if stage else []) + [_slug(v) for v in labels.values()] + [f"s{seed}"]
            name = "-".join(parts)
            check = copy.deepcopy(cfg)
            check.update(name=name, init_from=None)
            try:
                RunConfig.from_dict(check)
            except ConfigError as exc:
                raise ConfigError(f"cell {name}: {exc}") from None
            todo = [f for f in follow if _matches(cfg, f.get("when") or {})]
            cells.append(Cell(name, stage, seed, labels, cfg, copy.deepcopy(todo), arm=arm))
    if not cells:
        raise ConfigError(f"stage {stage or '(main)'} has no cells (every combination was skipped)")
    return cells


def _match(cell: Cell, candidates: list[Cell], parent: str) -> Cell:
    found = [
        c
        for c in candidates
        if c.seed == cell.seed
        and all(c.labels[k] == v for k, v in cell.labels.items() if k in c.labels)
    ]
    if len(found) != 1:
        raise ConfigError(
            f"cell {cell.name}: init_from {parent!r} matches {len(found)} cells, need exactly one "
            "(the parent stage's axes must be a subset of this stage's)"
        )
    return found[0]


# ----------------------------------------------------------------------------- issue 21
def _seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers (or a count), got {seeds!r}")
    return seeds


def _axes_and_labels(axes: dict[str, Any]) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Axes whose values may carry labels: ``{values: [...], labels: [...]}``."""
    plain: dict[str, Any] = {}
    labels: dict[str, list[str]] = {}
    for key, spec in axes.items():
        if isinstance(spec, dict):
            _check_keys(spec, ("values", "labels"), f"axis {key}")
            values, names = spec.get("values"), spec.get("labels")
            if not isinstance(names, list) or not isinstance(values, list):
                raise ConfigError(f"axis {key}: values and labels must both be lists")
            if len(names) != len(values) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(
                    f"axis {key}: labels must be one non-empty string per value "
                    f"({len(values)} values, {len(names)} labels)"
                )
            if len(set(names)) != len(names):
                raise ConfigError(f"axis {key}: labels must differ, got {names}")
            plain[key] = values
            labels[key] = names
        else:
            plain[key] = spec
    return _axes(plain), labels


def _arm(stage: str, label: str | None, labels: dict[str, str], named: set[str]) -> str:
    """An arm's name: the stage's label (or name), then each axis label (``col=value`` for
    plain values of axes other than method and bits), e.g. ``tune qat lr=0.01``."""
    parts = [label] if label else ([stage] if stage else [])
    for col, value in labels.items():
        plain = col in ("method", "bits") or col in named
        parts.append(value if plain else f"{col}={value}")
    return " ".join(parts) or "all"


def _monitors(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    from qatlab.train.monitors import check_monitors

    check_monitors(value, where)
    return copy.deepcopy(value)


def check_plots(plots: Any, values: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """``plots``: logged series to draw per arm over training steps, as keys or mappings
    ``{key, scale, ylabel, title, arms, log}`` (``arms``: only the arms whose labels take one
    of the listed values, as in ``contrasts``; ``log``: a log y axis); returns them as
    mappings. With the cells' label ``values`` (column -> values), ``arms`` is checked against
    them and returned as label strings."""
    if plots is None:
        return []
    if not isinstance(plots, list):
        raise ConfigError(f"plots must be a list of logged keys or {{key: ...}}, got {plots!r}")
    out = []
    for item in plots:
        item = {"key": item} if isinstance(item, str) else _mapping(item, "plots")
        _check_keys(item, PLOT_KEYS, "a plot")
        if not isinstance(item.get("key"), str) or not item["key"]:
            raise ConfigError(f"each plot needs a logged key, got {item!r}")
        scale = item.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ConfigError(f"plot {item['key']}: scale must be a number, got {scale!r}")
        if not isinstance(item.get("log", False), bool):
            raise ConfigError(f"plot {item['key']}: log must be true or false")
        if values is not None and item.get("arms"):
            from qatlab.compare.contrasts import parse_arms

            arms = parse_arms(item["arms"], f"plot {item['key']} arms", values)
            item = {**item, "arms": arms}
        out.append(item)
    return out


def _selection(spec: Any, stage: str, axes: dict[str, list], cells: list[Cell]) -> dict:
    """A stage's ``select``: checked; with its column, candidate values and arms."""
    spec = _mapping(spec, f"stage {stage} select")
    _check_keys(spec, SELECT_KEYS, f"stage {stage} select")
    axis, metric = spec.get("axis"), spec.get("metric", "val_acc")
    if axis not in axes:
        raise ConfigError(
            f"stage {stage!r}: select axis {axis!r} is not one of its axes "
            f"({', '.join(axes) or 'none'})"
        )
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise ConfigError(
            f"stage {stage!r}: select metric must be a validation metric (val_*), got "
            f"{metric!r}: test numbers never choose a setting"
        )
    mode = spec.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"stage {stage!r}: select mode must be max or min, got {mode!r}")
    column = _column(axis, axes)
    pool = spec.get("pool") or []
    pool = pool if isinstance(pool, list) else [pool]
    columns = {c for cell in cells for c in cell.labels}
    for col in pool:
        if col not in columns or col == column:
            raise ConfigError(
                f"stage {stage!r}: select pool {col!r} must be a label column of the stage "
                f"other than the selected one ({', '.join(sorted(columns - {column})) or 'none'})"
            )
    arms = []
    for cell in cells:
        arm = {k: v for k, v in cell.labels.items() if k != column and k not in pool}
        if arm not in arms:
            arms.append(arm)
    return {
        "axis": axis,
        "column": column,
        "metric": metric,
        "mode": mode,
        "pool": list(pool),
        "values": axes[axis],
        "arms": arms,
    }


def _uses(use: Any, stage: str, selections: dict, axes: dict) -> dict[str, str]:
    """A stage's ``use: {KEY: STAGE}``: KEY must be what STAGE (earlier) selects."""
    if use is None:
        return {}
    use = _mapping(use, f"stage {stage} use")
    for key, source in use.items():
        if source not in selections:
            raise ConfigError(
                f"stage {stage!r}: use {key}: {source!r} is not an earlier stage with select "
                f"(selecting stages so far: {', '.join(selections) or 'none'})"
            )
        if selections[source]["axis"] != key:
            raise ConfigError(
                f"stage {stage!r}: stage {source!r} selects {selections[source]['axis']}, not {key}"
            )
        if key in axes:
            raise ConfigError(f"stage {stage!r}: {key} is both an axis and used from {source!r}")
    return dict(use)


def _select_arm(cell: Cell, source: str, selections: dict) -> dict[str, str]:
    found = [
        arm
        for arm in selections[source]["arms"]
        if all(cell.labels[k] == v for k, v in arm.items() if k in cell.labels)
    ]
    if len(found) != 1:
        raise ConfigError(
            f"cell {cell.name}: the selection of stage {source!r} has {len(found)} arms "
            "agreeing with its labels, need exactly one (give this stage the axes that stage "
            "keeps besides the selected one)"
        )
    return found[0]


def arm_key(labels: dict[str, str]) -> str:
    """A selection arm as one string (its labels, sorted): the key of ``select_values``."""
    return json.dumps(labels, sort_keys=True)


def select_values(
    cells: list[Cell], rows: dict[str, dict[str, Any]], selection: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The selection of one stage: per arm (``arm_key``), the axis value whose mean over seeds
    (and the ``pool`` columns' values: one mean over all those cells) of ``selection["metric"]``
    (a ``val_*`` key, nothing else of a row is read) is best.
    ``rows``: finished cells' result rows by cell name; failed cells and non-finite numbers
    are left out, a value none of whose seeds finished is not a candidate. Returns
    ``{arm_key: {"value", "label", "means": {label: mean}, "seeds": n}}`` (``n``: the cells
    the chosen value's mean is over; arms with no candidate are absent)."""
    import math

    axis, column, metric = selection["axis"], selection["column"], selection["metric"]
    drop = {column, *selection.get("pool", ())}
    sign = 1.0 if selection["mode"] == "max" else -1.0
    per_arm: dict[str, dict[str, list]] = {}
    values: dict[str, Any] = {}
    for cell in cells:
        row = rows.get(cell.name)
        if row is None:
            continue
        value = row.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            continue
        arm = arm_key({k: v for k, v in cell.labels.items() if k not in drop})
        label = cell.labels[column]
        values[label] = _get(cell.config, axis)
        per_arm.setdefault(arm, {}).setdefault(label, []).append(float(value))
    out = {}
    for arm, by_label in per_arm.items():
        means = {label: sum(v) / len(v) for label, v in by_label.items()}
        best = max(means, key=lambda label: sign * means[label])  # ties: the first listed
        out[arm] = {
            "value": copy.deepcopy(values[best]),
            "label": best,
            "means": means,
            "seeds": len(by_label[best]),
        }
    return out


def resolve(cell: Cell, chosen: dict[str, dict[str, dict[str, Any]]]) -> bool:
    """Set the values ``cell`` uses from the selections made so far (``chosen``: stage ->
    ``select_values`` result); True once every used value is set. Raises ConfigError if the
    selecting stage finished with no candidate for the cell's arm."""
    for key, use in cell.uses.items():
        if key in cell.selected or use["stage"] not in chosen:
            continue
        pick = chosen[use["stage"]].get(arm_key(use["arm"]))
        if pick is None:
            raise ConfigError(
                f"stage {use['stage']!r} selected nothing for arm {use['arm']} (no finished "
                "cell with a finite metric)"
            )
        _set(cell.config, key, copy.deepcopy(pick["value"]))
        cell.selected[key] = pick["value"]
    return not cell.pending


# ----------------------------------------------------------------------------- helpers
def _axes(axes: dict[str, Any]) -> dict[str, list]:
    from qatlab import methods

    out = {}
    for key, values in axes.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"axis names are dotted config keys, got {key!r}")
        if values == ALL_METHODS and key == "method.name":
            values = list(methods.METHODS)  # registration order: float, qat, then the rest
        if not isinstance(values, list):
            raise ConfigError(f"axis {key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"axis {key} is empty: give at least one value")
        out[key] = values
    return out


def _column(key: str, axes: dict[str, list]) -> str:
    """Table column of an axis: ``method.name`` -> method, ``quant*`` -> bits, else last part."""
    if key in ("quant", "quant.weight_bits"):
        return "bits"
    if key.endswith(".name"):
        return key[: -len(".name")]
    last = key.rsplit(".", 1)[-1]
    clash = [k for k in axes if k != key and k.rsplit(".", 1)[-1] == last]
    return key if clash else last


def _label(config: dict[str, Any], key: str) -> str:
    if key in ("quant", "quant.weight_bits", "quant.act_bits"):  # W4A4-style
        return bits_label(config)
    value = _get(config, key)
    if isinstance(value, dict):
        if "name" in value:
            return str(value["name"])
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def bits_label(config: dict[str, Any]) -> str:
    """``float`` for a float run, else ``W4A4``-style."""
    from qatlab.quant import QuantConfig
    from qatlab.train.config import _quant_dict

    quant = config.get("quant")
    if quant is None:
        return "float"
    return QuantConfig.from_dict(_quant_dict(quant)).describe()


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "._=" else "-" for ch in text.lower())
    return keep.strip("-") or "x"


def _matches(config: dict[str, Any], when: dict[str, Any]) -> bool:
    for key, want in _mapping(when, "when").items():
        have = _get(config, key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; a mapping value on a section merges into it (``None`` clears it)."""
    current = _get(config, key)
    if isinstance(value, dict) and isinstance(current, dict):
        value = merge(current, value)
    if "." not in key:
        config[key] = value
    else:
        set_dotted(config, key, value)


def _nested(data: Any, where: str) -> dict[str, Any]:
    """A ``set`` mapping: nested sections or dotted keys, returned as ``{dotted_key: value}``
    (for ``_set``) when called from overrides, or merged nested dict for stage ``set``."""
    data = _mapping(data, where)
    if where == "set":
        out: dict[str, Any] = {}
        for key, value in data.items():
            _set(out, key, value)
        return out
    return data


def _list(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    return [_mapping(v, where) for v in value]


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of key: value, got {data!r}")
    return data


def _check_keys(data: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{key}' in {where}{tip}")
