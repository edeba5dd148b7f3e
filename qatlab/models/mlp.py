"""``mlp5`` (5 linear layers, any input shape) and ``cnn1d`` (small conv net for signals)."""

from __future__ import annotations

import math

from torch import nn

from qatlab.errors import ConfigError
from qatlab.models.registry import positive, register


@register("mlp5")
def mlp5(num_classes: int, input_shape: tuple[int, ...], width: int = 128) -> nn.Module:
    """Flatten, then 4 hidden ReLU layers of ``width`` and a linear classifier (5 nn.Linear)."""
    positive("mlp5", "width", width)
    dims = [math.prod(input_shape)] + [width] * 4
    body: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims, dims[1:], strict=False):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(width, num_classes))


@register("cnn1d")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> nn.Module:
    """Three Conv1d-BN-ReLU blocks (widths w, 2w, 2w; the middle one strided), global average
    pool, linear classifier. For (C, L) signals such as MNIST-1D only."""
    if len(input_shape) != 2:
        raise ConfigError(
            f"model cnn1d needs 1-D inputs (C, L), got {tuple(input_shape)}; "
            "use resnet20, mobilenetv2 or vit_tiny for images"
        )
    positive("cnn1d", "width", width)
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv1d(c, width, 5, padding=2, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm1d(2 * width),
        nn.ReLU(),
        nn.Conv1d(2 * width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm1d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
