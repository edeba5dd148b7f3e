"""CIFAR-form ResNets (3x3 stem, no max-pool) for 1-D or 2-D inputs: resnet18, resnet20."""

from __future__ import annotations

from torch import Tensor, nn

from qatlab.models.registry import conv_dims, layers, positive, register


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, bn, _ = layers(dims)
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 conv stem (no max-pool), stages of BasicBlocks (each after the first halving the
    resolution), global average pool, linear classifier ``fc``."""

    def __init__(self, dims: int, cin: int, widths: list[int], blocks: list[int], classes: int):
        super().__init__()
        conv, bn, pool = layers(dims)
        self.stem = nn.Sequential(
            conv(cin, widths[0], 3, 1, 1, bias=False), bn(widths[0]), nn.ReLU()
        )
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(dims, c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(pool(1), nn.Flatten())
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


@register("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64) -> nn.Module:
    """ResNet-18, CIFAR form: BasicBlocks [2, 2, 2, 2], widths width*(1, 2, 4, 8)."""
    dims = conv_dims("resnet18", input_shape)
    positive("resnet18", "width", width)
    return ResNet(
        dims, input_shape[0], [width * m for m in (1, 2, 4, 8)], [2, 2, 2, 2], num_classes
    )


@register("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """CIFAR ResNet-20: 3 stages of 3 BasicBlocks, widths width*(1, 2, 4) (16/32/64)."""
    dims = conv_dims("resnet20", input_shape)
    positive("resnet20", "width", width)
    return ResNet(dims, input_shape[0], [width, 2 * width, 4 * width], [3, 3, 3], num_classes)
