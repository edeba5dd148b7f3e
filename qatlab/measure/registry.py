"""One registry for every measurement of a trained model, and the context a measure reads.

A measure is ``fn(ctx, **options) -> {key: number}``: it reads a trained model (and its data)
through a :class:`MeasureContext`, never changes the model it is given, and returns a flat dict
of numbers (a list of numbers is allowed for histograms and curves: it is stored, not tabled);
files such as plots go into ``ctx.out_dir`` (atomically, :func:`atomic_path`). Its keyword
arguments are its options (checked before anything runs, :func:`check_options`). It declares at
registration the :class:`Column` s its keys are shown under and, optionally, the
:class:`Section` (report table) they belong to, so ``qatlab compare`` reports find a new
measure's numbers with no edit anywhere else::

    @register_measure("gap", columns=[Column("gap_acc", "gap %", better="min", section="gen")],
                      section=Section("gen", "Generalization"))
    def gap(ctx, batch_size: int = 512) -> dict: ...

Both ``qatlab compare`` (a cell of a grid) and ``qatlab measure`` (a saved run) provide a
context; this module imports neither the trainer nor the comparison engine.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from qatlab.errors import ConfigError


# ----------------------------------------------------------------------------- the context
@runtime_checkable
class MeasureContext(Protocol):
    """What a measure sees of a trained run.

    ``data``: its :class:`qatlab.data.DataBundle`; ``out_dir``: where files go; ``seed``: the
    seed every random choice of a measure derives from; ``device``; ``batch_size``: the run's
    training batch size; ``progress``: whether long searches may draw a progress bar;
    ``results``: what earlier measures of the same run returned (so ``bounds`` can reuse the
    ``flatness`` search).
    """

    out_dir: Path
    seed: int
    batch_size: int
    progress: bool
    results: dict[str, Any]

    @property
    def data(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    def model(self) -> Any:
        """A fresh copy of the trained model (best epoch if the run restored it), eval mode."""

    def final_model(self) -> Any | None:
        """A fresh copy of the model at the end of the last epoch (None if unknown)."""

    def init_state(self) -> dict[str, Any] | None:
        """The model's state dict at step 0 (before training), or None if the run kept none."""

    def method_hooks(self) -> list:
        """The training method's hooks as they ended training (their saved state loaded)."""

    def logged_records(self) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` records (epoch and logged step records), in order."""


# ----------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Column:
    """How a result key is shown in reports: header, scale (100 = percent), digits, better.

    ``key`` is an exact key, or a prefix ending in ``_`` for a family (``ptq_W4A4``...): then
    ``{}`` in ``header`` is replaced by the rest of the key, or ``label(rest)`` gives the header
    (None: that key is not a column). ``section``: the report table that shows it. ``order``:
    columns of a table sort by (order, registration): 1 puts one last. ``of_rest``: the rest of
    the key is itself a column (``final_gap_acc``): scale, digits and better side are its.
    """

    key: str
    header: str
    scale: float = 100.0
    digits: int = 1
    better: str | None = "max"  # "max", "min" or None (never marked)
    section: str = "accuracy"
    label: Callable[[str], str | None] | None = field(default=None, compare=False)
    order: int = 0
    of_rest: bool = False


@dataclass(frozen=True)
class Section:
    """A report table of the columns whose ``section`` is ``name``: heading and one paragraph.
    Sections without a hand-written renderer in the report get a generic table."""

    name: str
    title: str
    text: str = ""


COLUMNS: list[Column] = []
SECTIONS: dict[str, Section] = {}


def register_column(column: Column) -> Column:
    """Show result key ``column.key`` (or a family of keys) in reports."""
    COLUMNS.append(column)
    return column


def register_report_section(section: Section) -> Section:
    """Declare report section ``section.name`` (heading and text of its table)."""
    SECTIONS[section.name] = section
    return section


def column_for(key: str) -> tuple[Column, str] | None:
    """The column entry that shows ``key`` and its header, or None (not a report column)."""
    exact = {c.key for c in COLUMNS if not c.key.endswith("_")}
    for col in COLUMNS:
        if key == col.key:
            return col, col.header
        if col.key.endswith("_") and key.startswith(col.key) and key not in exact:
            suffix = key[len(col.key) :]
            if col.label is not None:
                header = col.label(suffix)
                if header is None:
                    continue
                inner = column_for(suffix) if col.of_rest else None
                if inner is not None:
                    rest = inner[0]
                    col = replace(col, scale=rest.scale, digits=rest.digits, better=rest.better)
                return col, header
            return col, col.header.format(suffix)
    return None


def column_rank(column: Column) -> tuple[int, int]:
    """Sort key of a column within its table: (order, registration index)."""
    return column.order, next(i for i, c in enumerate(COLUMNS) if c.key == column.key)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a report table can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- measures
@dataclass(frozen=True)
class Measure:
    """A registered measure: its function, options (with defaults), columns and description."""

    name: str
    fn: Callable[..., dict[str, Any]]
    columns: tuple[Column, ...] = ()
    section: Section | None = None

    @property
    def options(self) -> dict[str, Any]:
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    def __call__(self, ctx: MeasureContext, **options: Any) -> dict[str, Any]:
        return self.fn(ctx, **options)


MEASURES: dict[str, Measure] = {}


def register_measure(
    name: str, *, columns: list[Column] | tuple[Column, ...] = (), section: Section | None = None
) -> Callable:
    """Decorator: register ``fn(ctx, **options) -> {key: value}`` as measure ``name`` (a
    ``qatlab measure --what`` name and a grid's follow-up), with the report ``columns`` its keys
    appear under and the ``section`` they form (if not one the report already has)."""

    def wrap(fn: Callable) -> Callable:
        if section is not None:
            register_report_section(section)
        for col in columns:
            register_column(col)
        MEASURES[name] = Measure(name, fn, tuple(columns), section)
        return fn

    return wrap


def get_measure(name: str) -> Measure:
    """The measure registered as ``name``; unknown: one ConfigError line with a did-you-mean."""
    if name not in MEASURES:
        hint = difflib.get_close_matches(str(name), list(MEASURES), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown measure {name!r}{tip}; available: {', '.join(sorted(MEASURES))}"
        )
    return MEASURES[name]


def check_options(name: str, options: dict[str, Any], where: str = "measure") -> None:
    """Every key of ``options`` is an option of measure ``name``: else one ConfigError line."""
    valid = get_measure(name).options
    for key in options:
        if key not in valid:
            hint = difflib.get_close_matches(key, list(valid), n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else f"; options: {', '.join(valid)}"
            raise ConfigError(f"unknown option '{key}' of {where} {name}{tip}")


def run_measure(ctx: MeasureContext, name: str, **options: Any) -> dict[str, Any]:
    """Run measure ``name`` on ``ctx``; its result is also added to ``ctx.results``."""
    check_options(name, options)
    out = get_measure(name)(ctx, **options)
    ctx.results.update(out)
    return out


# ----------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write to; renamed onto ``path`` when
    the block ends without error, removed otherwise: nothing half-written is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # what a plain open() gives under the usual umask, not 0o600
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
