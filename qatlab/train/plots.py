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
    """Loss and accuracy per epoch (train and val) from ``metrics.jsonl`` records.

    ``records`` is one run's records, or ``{label: records}`` to overlay several runs.
    """
    plt = _pyplot()
    runs = records if isinstance(records, dict) else {"": records}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, recs in runs.items():
        epochs = [r for r in recs if "val_loss" in r or "train_loss" in r]
        prefix = f"{label} " if label else ""
        for ax, kind in zip(axes, ("loss", "acc"), strict=True):
            for split, style in (("train", "--"), ("val", "-")):
                pts = [
                    (r["epoch"], r[f"{split}_{kind}"])
                    for r in epochs
                    if r.get(f"{split}_{kind}") is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, marker=".", label=f"{prefix}{split}")
    for ax, kind in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


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
