"""Loss landscapes along filter-normalized random directions (Li et al. 2018).

A direction ``d`` has the shape of the perturbable tensors (:func:`qatlab.measure.flatness.
perturbable_weights`, BN not folded by default): Gaussian, then each filter (slice along axis
0 of a Conv/Linear weight) rescaled to the norm of the same filter of the weight,
``d_f * ||w_f|| / (||d_f|| + 1e-10)``; biases and norm-layer parameters (every tensor with
fewer than 2 dimensions) get a zero direction (``ignore='biasbn'``). The loss and accuracy on
``(x, y)`` are evaluated in eval mode at ``w + a d1`` (and ``+ b d2`` in 2-D) for ``a, b`` on a
grid of ``points`` values in ``[-span, span]``. For a quantized model ``perturb`` picks the
weight moved (``"q"``: ``q(w)``, default; ``"latent"``; ``"float"``), as in the flatness
searches. The model is never modified.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.measure.flatness import _generator, _Perturbed


def filter_normalized_direction(
    weights: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A random direction with each filter's norm equal to the weight filter's norm; zero for
    tensors with fewer than 2 dimensions (biases, norm layers)."""
    out = {}
    for k, w in weights.items():
        if w.dim() < 2:
            out[k] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        out[k] = d * (wn / (dn + 1e-10)).reshape(-1, *([1] * (w.dim() - 1)))
    return out


def landscape_directions(
    model: nn.Module, *, dims: int = 1, seed: int = 0, perturb: str = "q", fold_bn: bool = False
) -> list[dict[str, Tensor]]:
    """The ``dims`` filter-normalized directions :func:`loss_landscape` uses (seeded)."""
    weights = _Perturbed(model, perturb, fold_bn).weights
    return [filter_normalized_direction(weights, _generator(seed, 2 << 20, i)) for i in range(dims)]


@torch.no_grad()
def _loss_acc(pm: _Perturbed, x: Tensor, y: Tensor, deltas, batch_size: int) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        out = pm(x[i : i + batch_size], deltas)
        yb = y[i : i + batch_size]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return loss / n, correct / n


def loss_landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    dims: int = 1,
    points: int = 51,
    span: float = 1.0,
    seed: int = 0,
    perturb: str = "q",
    fold_bn: bool = False,
    batch_size: int = 4096,
) -> dict:
    """Cross-entropy and accuracy on ``(x, y)`` along ``dims`` (1 or 2) filter-normalized random
    directions: ``{"coords": [points values in [-span, span]], "loss": [...], "acc": [...]}``
    (1-D), or ``loss[i][j]``/``acc[i][j]`` at ``(coords[i], coords[j])`` (2-D; ``points^2``
    evaluations). ``x, y``: training data (a fixed subset is fine)."""
    if dims not in (1, 2):
        raise ConfigError(f"loss landscape dims must be 1 or 2, got {dims!r}")
    if points < 2 or not span > 0:
        raise ConfigError(f"landscape needs points >= 2 and span > 0; got {points}, {span}")
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"landscape needs matching non-empty x and y ({len(x)}, {len(y)})")
    pm = _Perturbed(model, perturb, fold_bn)
    dirs = [
        filter_normalized_direction(pm.weights, _generator(seed, 2 << 20, i)) for i in range(dims)
    ]
    coords = [span * (2 * i / (points - 1) - 1) for i in range(points)]  # exact 0 at the middle
    device = next(iter(pm.weights.values())).device if pm.weights else x.device
    x, y = x.to(device), y.to(device)
    with pm.ready():
        if dims == 1:
            res = [
                _loss_acc(pm, x, y, {k: a * d for k, d in dirs[0].items()}, batch_size)
                for a in coords
            ]
            return {"coords": coords, "loss": [r[0] for r in res], "acc": [r[1] for r in res]}
        loss, acc = [], []
        for a in coords:
            row = [
                _loss_acc(
                    pm, x, y, {k: a * dirs[0][k] + b * dirs[1][k] for k in pm.weights}, batch_size
                )
                for b in coords
            ]
            loss.append([r[0] for r in row])
            acc.append([r[1] for r in row])
    return {"coords": coords, "loss": loss, "acc": acc}


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically (temp file in the same folder + ``os.replace``)."""
    import os
    import tempfile

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_landscape(curves: Mapping[str, dict], path: str | Path) -> Path:
    """PNG of :func:`loss_landscape` results ``{label: result}``: 1-D results overlaid (loss and
    accuracy panels), 2-D results as one loss contour per label. Written atomically."""
    if not curves:
        raise ConfigError("plot_landscape: no landscapes to plot")
    plt = _pyplot()
    two_d = {k: v for k, v in curves.items() if v["loss"] and isinstance(v["loss"][0], list)}
    one_d = {k: v for k, v in curves.items() if k not in two_d}
    if one_d and not two_d:
        fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, c in one_d.items():
            ax_l.plot(c["coords"], c["loss"], label=label)
            ax_a.plot(c["coords"], c["acc"], label=label)
        ax_l.set_yscale("log")
        ax_l.set_ylabel("training loss")
        ax_a.set_ylabel("training accuracy")
        for ax in (ax_l, ax_a):
            ax.set_xlabel("step along filter-normalized direction")
            ax.grid(True, alpha=0.3)
        ax_l.legend()
        return _save_png(fig, path)
    panels = list(curves.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (label, c) in zip(axes[0], panels, strict=True):
        if label in two_d:
            loss = torch.tensor(c["loss"]).clamp_min(1e-12).log10().T  # rows = second direction
            cs = ax.contourf(c["coords"], c["coords"], loss.numpy(), levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="log10 training loss")
            ax.set_xlabel("direction 1")
            ax.set_ylabel("direction 2")
        else:
            ax.plot(c["coords"], c["loss"])
            ax.set_yscale("log")
        ax.set_title(label)
    return _save_png(fig, path)
