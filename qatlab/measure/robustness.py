"""Accuracy under input corruptions (CIFAR-10-C style for images, 1-D analogues for signals),
per corruption and severity, and the means."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qatlab.data.corruptions import SEVERITIES, PixelRange, corrupt, corruption_table
from qatlab.errors import ConfigError

CHUNK = 1024  # samples corrupted together (seeded per chunk, so batch_size changes nothing)


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device) -> int:
    hits = 0
    for i in range(0, len(y), batch_size):
        out = model(x[i : i + batch_size].to(device))
        hits += int((out.argmax(1) == y[i : i + batch_size].to(device)).sum())
    return hits


@torch.no_grad()
def corruption_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 512,
    pixel_range: PixelRange | None = None,
) -> dict[str, float]:
    """Accuracy of ``model`` (eval mode, restored after) on ``(x, y)`` under each corruption.

    Returns a flat dict: ``corr_<name>_s<k>`` (accuracy at severity k), ``corr_<name>`` (mean
    over the severities), ``corr_mean`` (mean over corruptions) and ``clean_acc``. ``names``
    default to every corruption for ``x``'s rank (:mod:`qatlab.data.corruptions`);
    ``pixel_range`` maps normalised images to pixels (e.g. ``dataset_pixel_range("cifar10")``).
    Corruptions are drawn per chunk of 1024 samples from ``(seed, corruption, severity,
    chunk)``, so the result does not depend on ``batch_size``.
    """
    table = corruption_table(x)
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(
            f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(table)}"
        )
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ConfigError(f"severities must be integers from 1 to 5, got {list(severities)}")
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(
            f"corruption_accuracy needs matching non-empty x and y ({len(x)}, {len(y)})"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out: dict[str, float] = {}
    try:
        n = len(y)
        out["clean_acc"] = _correct(model, x, y, batch_size, device) / n
        for name in names:
            accs = []
            for s in severities:
                hits = 0
                for chunk, i in enumerate(range(0, n, CHUNK)):
                    cseed = ((seed * 1_000_003 + list(table).index(name)) * 7 + s) * 100_003 + chunk
                    xc = corrupt(x[i : i + CHUNK], name, s, cseed, pixel_range=pixel_range)
                    hits += _correct(model, xc, y[i : i + CHUNK], batch_size, device)
                out[f"corr_{name}_s{s}"] = hits / n
                accs.append(hits / n)
            out[f"corr_{name}"] = sum(accs) / len(accs)
        out["corr_mean"] = sum(out[f"corr_{n}"] for n in names) / len(names)
    finally:
        for m, mode in modes:
            m.training = mode
    return out
