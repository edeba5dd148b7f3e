"""Models: every model on every suitable shape, exact weight-layer classes, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qatlab.models as M
from qatlab.errors import ConfigError

SHAPES = [(1, 40), (1, 8, 8), (3, 32, 32)]
CASES = [(n, s) for n in M.list_models() for s in SHAPES if not (n == "cnn1d" and len(s) == 3)]
SMALL = {"resnet18": {"width": 8}}


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_backward_and_layer_order(name, shape):
    torch.manual_seed(0)
    model = M.create(name, 7, shape, **SMALL.get(name, {}))
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    weight_layers = [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "weight")
        and not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))
    ]
    assert all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear) for _, m in weight_layers)
    assert isinstance(weight_layers[0][1], (nn.Conv1d, nn.Conv2d, nn.Linear))
    assert type(weight_layers[-1][1]) is nn.Linear and weight_layers[-1][1].out_features == 7
    conv = nn.Conv1d if len(shape) == 2 else nn.Conv2d
    if name != "mlp5":
        assert isinstance(weight_layers[0][1], conv)


def test_mobilenetv2_is_depthwise_separable():
    model = M.create("mobilenetv2", 10, (1, 40))
    dw = [m for m in model.modules() if isinstance(m, nn.Conv1d) and m.groups == m.in_channels > 1]
    assert len(dw) >= 5


@pytest.mark.parametrize(
    "name,shape,kwargs,match",
    [
        ("cnn1d", (3, 32, 32), {}, "needs 1-D inputs"),
        ("resnet20", (40,), {}, r"\(C, L\) or \(C, H, W\)"),
        ("vit_tiny", (3, 30, 30), {"patch": 4}, "must divide"),
        ("resnet", (3, 32, 32), {}, "did you mean"),
        ("mlp5", (1, 40), {"depth": 3}, "has no option"),
    ],
)
def test_mismatches_are_clear_errors(name, shape, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        M.create(name, 10, shape, **kwargs)
