"""The size of SAQ's ball per layer: ``||e_l|| / ||q(w_l)||`` under ``ball="raw"`` and ``"std"``.

One case-3 perturbation (:class:`qatlab.methods.saq.SAQ`, ``first_pass`` + ``perturbation``) at
``rho`` on freshly initialised cnn1d and mlp5 models for MNIST-1D (LSQ W4A4 at qatlab's
defaults: first and last layer weights 8 bit; activation steps calibrated on the batch), from
one random MNIST-1D-shaped batch (128 x 1 x 40, torch seed ``--seed``), SGD at lr 0 (nothing
moves). Why: the same ``rho`` is a ball 10-40x larger relative to ``q(w)`` in raw units than in
the SAQ authors' standardized-weight units (docs/results/saq.md, "The two balls").

Run: ``python benchmarks/saq_ball.py --rho 0.3 --csv docs/results/saq_ball_sizes.csv`` (a few
seconds of CPU; ``--seed``, default 0). Prints a markdown table; ``--csv`` also writes its rows.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qatlab import models
from qatlab.methods.saq import SAQ
from qatlab.quant import QuantConfig, calibrate, quantize, quantized_weights

MODELS = ("cnn1d", "mlp5")
BALLS = ("raw", "std")


def ball_sizes(rho: float = 0.3, seed: int = 0) -> list[dict[str, Any]]:
    """One row per model, quantized layer and ball: ``rel = ||e_l|| / ||q(w_l)||``."""
    rows = []
    for name in MODELS:
        torch.manual_seed(seed)
        model = quantize(models.create(name, 10, (1, 40)), QuantConfig())
        x, y = torch.randn(128, 1, 40), torch.randint(0, 10, (128,))
        calibrate(model, [x])
        model.train()
        qw = quantized_weights(model)
        for ball in BALLS:
            opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=rho, ball=ball)
            with opt.first_pass():
                F.cross_entropy(model(x), y).backward()
            e = opt.perturbation()
            opt.zero_grad()
            for layer, d in e.items():
                rows.append(
                    {
                        "model": name,
                        "layer": layer,
                        "shape": "x".join(map(str, d.shape)),
                        "ball": ball,
                        "rho": rho,
                        "rel": float(d.norm() / qw[layer].norm()),
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per layer, raw and std side by side, and their ratio."""
    lines = [
        "| model | layer | weight shape | raw ball | std ball | raw / std |",
        "|---|---|---|---|---|---|",
    ]
    layers: dict[tuple, dict[str, float]] = {}
    for r in rows:
        layers.setdefault((r["model"], r["layer"], r["shape"]), {})[r["ball"]] = r["rel"]
    for (model, layer, shape), by in layers.items():
        lines.append(
            f"| {model} | {layer} | {shape} | {by['raw']:.4f} | {by['std']:.4f} | "
            f"{by['raw'] / by['std']:.1f} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV, written to a temporary file and renamed (nothing half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rho", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ball_sizes(args.rho, args.seed)
    if args.csv is not None:
        write_csv(args.csv, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
