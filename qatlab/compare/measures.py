"""Follow-up measures run on a trained cell, and the result columns reports know about.

A follow-up is a function ``measure(ctx, **options) -> dict`` registered with
:func:`register_measure`; its keyword arguments are its options (checked before anything
runs) and the keys of the dict it returns become columns of the cell's result row. A
column's header, scale and direction ("higher is better") come from :data:`COLUMNS`: a new
method or measure adds a function and, if it wants nice headers, a column entry.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qatlab.errors import ConfigError


# ----------------------------------------------------------------------------- context
class CellContext:
    """What a measure sees: the run's config and folder, its summary, and (loaded on first use)
    its data and the trained model (``best.pt`` when the run restored the best epoch, which is
    the model its summary describes, else ``ckpt.pt``)."""

    def __init__(self, cfg, summary: dict[str, Any]) -> None:
        self.cfg = cfg
        self.summary = summary
        self.run_dir: Path = cfg.run_dir

    @cached_property
    def data(self):
        from qatlab.train.runner import load_data

        return load_data(self.cfg.data)

    @cached_property
    def checkpoint(self) -> dict[str, Any]:
        from qatlab.train.checkpoint import load_checkpoint

        return load_checkpoint(self.run_dir / "ckpt.pt")

    def model(self):
        """A fresh copy of the trained model (measures may modify it)."""
        from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint

        best = self.run_dir / "best.pt"
        path = best if self.cfg.train.restore_best and best.is_file() else self.run_dir / "ckpt.pt"
        ckpt = self.checkpoint if path.name == "ckpt.pt" else load_checkpoint(path)
        return model_from_checkpoint(ckpt, path).eval().to(self.device)

    @cached_property
    def device(self):
        """Where follow-ups run: the cell's ``train.device`` (``auto``: the GPU if any)."""
        from qatlab.train.distributed import resolve_device

        return resolve_device(self.cfg.train.device)


# ----------------------------------------------------------------------------- registry
MEASURES: dict[str, Callable[..., dict[str, Any]]] = {}


def register_measure(name: str) -> Callable:
    """Decorator: register ``fn(ctx, **options) -> {column: value}`` as follow-up ``name``."""

    def wrap(fn: Callable) -> Callable:
        MEASURES[name] = fn
        return fn

    return wrap


def _options(fn: Callable) -> dict[str, Any]:
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:]}


def check_follow_up(spec: dict[str, Any]) -> None:
    """A follow-up entry ``{measure: NAME, when: {...}, **options}``: one ConfigError if wrong."""
    name = spec.get("measure")
    if name not in MEASURES:
        hint = difflib.get_close_matches(str(name), list(MEASURES), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown follow-up measure {name!r}{tip}; available: {', '.join(sorted(MEASURES))}"
        )
    valid = _options(MEASURES[name])
    for key in spec:
        if key not in ("measure", "when") and key not in valid:
            hint = difflib.get_close_matches(key, list(valid), n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else f"; options: {', '.join(valid)}"
            raise ConfigError(f"unknown option '{key}' of follow-up {name}{tip}")


def run_follow_up(ctx: CellContext, spec: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in spec.items() if k not in ("measure", "when")}
    return MEASURES[spec["measure"]](ctx, **options)


# ----------------------------------------------------------------------------- measures
@register_measure("ptq")
def ptq(
    ctx: CellContext,
    bits: list = (2, 3, 4, 8),
    act_bits: Any = "same",
    bn_reestimate: bool = False,
    calib_batches: int = 4,
    quant: dict | None = None,
) -> dict[str, Any]:
    """Test accuracy of the trained model's (latent) float weights post-training quantized at
    each width (:func:`qatlab.train.runner.ptq_sweep`): columns ``ptq_W4A4`` etc."""
    from qatlab.train.runner import ptq_sweep

    rows = ptq_sweep(
        ctx.model(),
        ctx.data,
        list(bits),
        act_bits=act_bits,
        calib_batches=calib_batches,
        bn_reestimate=bn_reestimate,
        quant_options=quant,
    )
    return {f"ptq_{r['bits']}": r["acc"] for r in rows if r["method"] == "ptq"}


@register_measure("crossbit")
def crossbit(ctx: CellContext, bits: list = (2, 3, 4, 8), final: bool = False) -> dict[str, Any]:
    """Wenshøj et al.'s cross-bit row (:func:`qatlab.measure.cross_bit`): weights-only max-abs
    PTQ on the restricted grid at each width, float, and a QAT model as trained (``xb_*``).
    ``final``: also of the last epoch's model (``ckpt.pt``, ``xbf_*``) when the run ended on
    its best epoch, so early-stopped and final-epoch results come from one run."""
    from qatlab.measure import cross_bit, evaluate
    from qatlab.train.checkpoint import model_from_checkpoint

    test = ctx.data.test

    def row(model, prefix: str) -> dict[str, Any]:
        res = cross_bit(model, lambda m: evaluate(m.eval(), test, 512)["acc"], list(bits))
        return {f"{prefix}{k}": v for k, v in res.items()}

    out = row(ctx.model(), "xb_")
    if final:
        last = model_from_checkpoint(ctx.checkpoint, ctx.run_dir / "ckpt.pt")
        out.update(row(last.eval().to(ctx.device), "xbf_"))
    return out


@register_measure("bn_reestimate")
def bn_reestimate(ctx: CellContext, batches: int = 50, seed: int = 1) -> dict[str, Any]:
    """Test accuracy after re-estimating BatchNorm statistics on ``batches`` shuffled training
    batches, and how far the running mean/var moved (relative L2, averaged over BN layers)."""
    from qatlab.data import make_loader
    from qatlab.measure import evaluate
    from qatlab.quant import reestimate_bn

    model = ctx.model()
    loader = make_loader(ctx.data.train_eval, ctx.cfg.train.batch_size, shuffle=True, seed=seed)
    report = reestimate_bn(model, loader, batches)
    return {
        "acc_bn": evaluate(model, ctx.data.test, 512)["acc"],
        "bn_mean_err": _avg([r["mean"] for r in report.values()]),
        "bn_var_err": _avg([r["var"] for r in report.values()]),
    }


@register_measure("oscillation")
def oscillation(
    ctx: CellContext, threshold: float = 0.01, bins: int = 25, hist_max: float = 0.1
) -> dict[str, Any]:
    """At the end of training, from the method's saved state: share of weights whose
    oscillation frequency exceeds ``threshold``, share frozen, and the frequency histogram."""
    import torch

    from qatlab.methods import build_hooks
    from qatlab.methods.oscillation import IterativeFreezing, OscillationTracker
    from qatlab.train.checkpoint import model_from_checkpoint

    saved = ctx.checkpoint.get("hooks") or []
    if ctx.cfg.quant is None or not saved:
        return {}
    model = model_from_checkpoint(ctx.checkpoint, ctx.run_dir / "ckpt.pt").to(ctx.device)
    hooks = build_hooks(ctx.cfg.method.name, ctx.cfg.method.options, model, ctx.cfg.quant, 1)
    trackers = []
    for hook, state in zip(hooks, saved, strict=False):  # the method's hooks, as they ended
        if isinstance(hook, OscillationTracker):
            hook.load_state_dict(state)
            trackers.append(hook)
    if not trackers:
        return {}
    f = torch.cat([t.frequencies() for t in trackers])
    freezers = [t for t in trackers if isinstance(t, IterativeFreezing)]
    return {
        "osc_share": float((f > threshold).float().mean()),
        "frozen_share": _avg([t.frozen_share() for t in freezers]) if freezers else None,
        "osc_hist": torch.histc(f, bins=bins, min=0.0, max=hist_max).tolist(),
    }


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- logged
def logged_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of every step-logged statistic in ``metrics.jsonl`` (``osc_share``,
    ``frozen_share``, transition rate ``tr``...), as ``log_<name>`` columns."""
    out: dict[str, Any] = {}
    for r in records:
        for key in LOGGED:
            if isinstance(r.get(key), (int, float)):
                out[f"log_{key}"] = r[key]
    return out


LOGGED = ("osc_share", "frozen_share", "tr")


# ----------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Column:
    """How a result column is shown: header, scale (100 = percent), digits, better."""

    key: str  # exact key, or a prefix ending in "_" for families such as ptq_W4A4
    header: str  # "{}" is replaced by the part after the prefix
    scale: float = 100.0
    digits: int = 1
    better: str | None = "max"  # "max", "min" or None (never marked)
    section: str = "accuracy"  # which report table shows it


COLUMNS: list[Column] = [
    Column("test_acc", "test acc %"),
    Column("acc_bn", "test acc % (BN re-est.)"),
    Column("ptq_", "PTQ {} %", section="crossbit"),
    Column("xb_", "PTQ {}-bit %", section="crossbit"),
    Column("xbf_", "final: PTQ {}-bit %", section="crossbit"),
    Column("osc_share", "oscillating %", better="min", digits=2, section="oscillation"),
    Column("frozen_share", "frozen %", better=None, digits=2, section="oscillation"),
    Column("log_osc_share", "oscillating % (logged)", 100.0, 2, "min", "oscillation"),
    Column("log_frozen_share", "frozen % (logged)", better=None, digits=2, section="oscillation"),
    Column("log_tr", "transition rate %", better=None, digits=3, section="oscillation"),
    Column("bn_mean_err", "BN mean err %", better=None, section="oscillation"),
    Column("bn_var_err", "BN var err %", better=None, section="oscillation"),
    Column("wall_time_s", "train time s", scale=1.0, better=None),
]


def register_column(column: Column) -> None:
    """Show result key ``column.key`` (or a family of keys) in reports."""
    COLUMNS.append(column)


def column_for(key: str) -> tuple[Column, str] | None:
    """The column entry that shows ``key`` and its header, or None (not a report column)."""
    for col in COLUMNS:
        if key == col.key:
            return col, col.header
        if col.key.endswith("_") and key.startswith(col.key) and key not in _EXACT:
            suffix = key[len(col.key) :]
            if col.key in ("xb_", "xbf_") and not suffix.isdigit():  # xb_float, xb_trained
                return col, f"{'final: ' if col.key == 'xbf_' else ''}{suffix} %"
            return col, col.header.format(suffix)
    return None


_EXACT = {c.key for c in COLUMNS if not c.key.endswith("_")}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
