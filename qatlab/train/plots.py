"""PNG plots of results (matplotlib, Agg backend): training curves and accuracy bars."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qatlab.train.metrics import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def plot_curves(
    records: Sequence[dict[str, Any]] | dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    title: str = "",
) -> None:
    """Loss and accuracy per epoch (train and val) from ``metrics.jsonl`` records, and a third
    panel with the transition rate when the records carry ``tr`` (plus TALR's running rate
    ``talr_K``, target ``talr_R`` and, on a second axis, its LR ``talr_U`` when logged).

    ``records`` is one run's records, or ``{label: records}`` to overlay several runs.
    """
    plt = _pyplot()
    runs = records if isinstance(records, dict) else {"": records}
    with_tr = any("tr" in r for recs in runs.values() for r in recs)
    fig, axes = plt.subplots(1, 3 if with_tr else 2, figsize=(15 if with_tr else 10, 3.6))
    for label, recs in runs.items():
        epochs = [r for r in recs if "val_loss" in r or "train_loss" in r]
        prefix = f"{label} " if label else ""
        for ax, kind in zip(axes[:2], ("loss", "acc"), strict=True):
            for split, style in (("train", "--"), ("val", "-")):
                pts = [
                    (r["epoch"], r[f"{split}_{kind}"])
                    for r in epochs
                    if r.get(f"{split}_{kind}") is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, marker=".", label=f"{prefix}{split}")
    for ax, kind in zip(axes[:2], ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if with_tr:
        _plot_rates(axes[2], runs)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def _plot_rates(ax, runs: dict[str, Sequence[dict[str, Any]]]) -> None:
    """Transition rate (%) per step, in epochs on the x axis; TALR's K, R and U when logged."""
    u_ax = None
    for label, recs in runs.items():
        prefix = f"{label} " if label else ""
        ends = [r for r in recs if "val_loss" in r and r.get("epoch", 0) > 0 and r.get("step")]
        per_epoch = ends[0]["step"] / ends[0]["epoch"] if ends else 1.0
        for key, style, name in (
            ("tr", "-", "TR k_t"),
            ("talr_K", "-", "running TR K_t"),
            ("talr_R", "--", "target R_t"),
        ):
            pts = [(r["step"] / per_epoch, 100 * r[key]) for r in recs if key in r and "step" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                alpha = 0.4 if key == "tr" else 1.0
                ax.plot(xs, ys, style, lw=1, alpha=alpha, label=f"{prefix}{name}")
        pts = [(r["step"] / per_epoch, r["talr_U"]) for r in recs if "talr_U" in r]
        if pts:
            u_ax = u_ax or ax.twinx()
            xs, ys = zip(*pts, strict=True)
            u_ax.plot(xs, ys, ":", color="tab:red", label=f"{prefix}U_t")
    ax.set_xlabel("epoch")
    ax.set_ylabel("transition rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if u_ax is not None:
        u_ax.set_ylabel("TALR learning rate U_t")
        u_ax.legend(fontsize=8, loc="upper right")


def plot_bars(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test accuracy per result row (``label`` and ``acc`` keys), as labelled bars."""
    plt = _pyplot()
    labels = [str(r["label"]) for r in rows]
    accs = [100 * float(r["acc"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    bars = ax.bar(labels, accs, color="tab:blue")
    for bar, acc in zip(bars, accs, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, acc + 0.5, f"{acc:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.autofmt_xdate(rotation=20)
    _save(fig, path)
    plt.close(fig)
