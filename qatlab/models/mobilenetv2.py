"""MobileNetV2, CIFAR form (stride-1 stem), for 1-D or 2-D inputs: depthwise separable blocks
with linear bottlenecks, the architecture where weight oscillations hurt most."""

from __future__ import annotations

from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.models.registry import conv_dims, layers, positive, register

# (expansion, out channels, repeats, stride) — a shortened CIFAR schedule by default
_FULL = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
_SMALL = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)]


def _round(c: float) -> int:
    """Channels rounded to a multiple of 8 (at least 8)."""
    return max(8, int(c + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped if ``expand`` is 1), 3x3 depthwise conv, 1x1 linear projection;
    a residual connection when input and output match."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        conv, bn, _ = layers(dims)
        hidden = cin * expand
        body: list[nn.Module] = []
        if expand != 1:
            body += [conv(cin, hidden, 1, bias=False), bn(hidden), nn.ReLU6()]
        body += [
            conv(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            bn(hidden),
            nn.ReLU6(),
            conv(hidden, cout, 1, bias=False),  # linear bottleneck: no activation
            bn(cout),
        ]
        self.body = nn.Sequential(*body)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


@register("mobilenetv2")
def mobilenetv2(
    num_classes: int, input_shape: tuple[int, ...], width_mult: float = 0.5, depth: str = "small"
) -> nn.Module:
    """MobileNetV2, CIFAR form: stride-1 stem, inverted residual blocks, 1x1 head conv, global
    pool, linear classifier. ``depth="small"`` (default, 8 blocks, 2 downsamplings, head 320)
    or ``"full"`` (17 blocks, 3 downsamplings, head 1280); channels scaled by ``width_mult``."""
    dims = conv_dims("mobilenetv2", input_shape)
    positive("mobilenetv2", "width_mult", width_mult, integer=False)
    if depth not in ("small", "full"):
        raise ConfigError(f"model mobilenetv2: depth must be 'small' or 'full', got {depth!r}")
    conv, bn, pool = layers(dims)
    schedule = _FULL if depth == "full" else _SMALL
    c = _round(32 * width_mult)
    blocks: list[nn.Module] = [
        nn.Sequential(conv(input_shape[0], c, 3, 1, 1, bias=False), bn(c), nn.ReLU6())
    ]
    for t, out, n, s in schedule:
        out = _round(out * width_mult)
        for i in range(n):
            blocks.append(InvertedResidual(dims, c, out, s if i == 0 else 1, t))
            c = out
    last = _round((1280 if depth == "full" else 320) * max(1.0, width_mult))
    blocks += [conv(c, last, 1, bias=False), bn(last), nn.ReLU6(), pool(1), nn.Flatten()]
    return nn.Sequential(*blocks, nn.Linear(last, num_classes))
