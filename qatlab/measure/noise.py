"""Quantization as weight noise: per layer the step ``s``, the uniform-noise variance ``s^2/12``
and the measured ``Var(q(w) - w) / (s^2/12)`` (1 when the weights spread over many bins and
are not clipped; above 1 with clipping, below 1 when many weights sit near a grid point)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qatlab.quant.layers import quant_layers


@torch.no_grad()
def quantization_noise(model: nn.Module) -> list[dict]:
    """One row per quantized layer (registration order): ``name``, ``bits``, ``step`` (mean
    over channels), ``noise_var`` (mean over channels of ``s_c^2/12``), ``noise_ratio``
    (``Var(q(w) - w) / (s^2/12)`` per channel with its own ``s_c`` where the quantizer is per
    channel, then averaged over channels), ``clipped`` (fraction of weights outside the grid),
    ``per_channel`` and ``num_weights``. Read-only."""
    rows = []
    for name, layer in quant_layers(model):
        q = layer.weight_quantizer
        w = layer.weight.detach().float()
        err = (q.quantize_detached(w) - w).reshape(w.shape[0], -1)
        step = q.current_step(w).detach().float().reshape(-1)  # [C] or [1]
        n, p = q.grid_range
        levels = torch.round(w * (1.0 / q.broadcast_step(w)))  # as Quantizer.integer rounds
        clipped = float(((levels < n) | (levels > p)).float().mean())
        if step.numel() > 1:
            var = err.var(dim=1, unbiased=False)  # per channel
            ratio = float((var / (step.square() / 12)).mean())
        else:
            var = err.reshape(-1).var(unbiased=False)
            ratio = float(var / (step[0] ** 2 / 12))
        rows.append(
            {
                "name": name,
                "bits": q.bits,
                "step": float(step.mean()),
                "noise_var": float((step.square() / 12).mean()),
                "noise_ratio": ratio,
                "clipped": clipped,
                "grid": [n, p],
                "per_channel": step.numel() > 1,
                "num_weights": w.numel(),
            }
        )
    return rows


def plot_step_sizes(by_bits: dict[str, list[dict]], path: str | Path) -> Path:
    """PNG of the step size by layer (log y), one line per bit width: ``by_bits`` maps a label
    (e.g. ``"W4"``) to :func:`quantization_noise` rows. Written atomically; returns the path."""
    from qatlab.measure.landscape import _pyplot, _save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    names: list[str] = []
    for label, rows in by_bits.items():
        for r in rows:
            if r["name"] not in names:
                names.append(r["name"])
        xs = [names.index(r["name"]) for r in rows]
        ax.plot(xs, [r["step"] for r in rows], marker="o", label=str(label))
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("weight step size s (mean over channels)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="bit width", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()  # the legend sits outside the axes: it never hides a line
    return _save_png(fig, path)
