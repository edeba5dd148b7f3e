"""Models: every model on every suitable shape, exact weight-layer classes, layer order, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qatlab.models as M
from qatlab.errors import ConfigError

SHAPES = [(1, 40), (1, 8, 8), (3, 32, 32)]
CASES = [(n, s) for n in M.list_models() for s in SHAPES if not (n == "cnn1d" and len(s) == 3)]
SMALL = {"resnet18": {"width": 8}}  # keep the big one cheap in the forward/backward test
WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning a ``weight`` parameter that are not norm layers, in registration order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if "weight" in dict(m.named_parameters(recurse=False)) and not isinstance(m, NORM_TYPES)
    ]


def test_registry_lists_the_models():
    assert M.list_models() == ["cnn1d", "mlp5", "mobilenetv2", "resnet18", "resnet20", "vit_tiny"]
    with pytest.raises(ValueError, match="already registered"):
        M.register("mlp5")(lambda num_classes, input_shape: nn.Identity())


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_backward_layer_types_and_order(name, shape):
    torch.manual_seed(0)
    model = M.create(name, 7, shape, **SMALL.get(name, {}))
    layers = _weight_layers(model)
    assert layers and all(type(m) in WEIGHT_TYPES for _, m in layers)  # exact classes
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    wrong_conv = nn.Conv2d if len(shape) == 2 else nn.Conv1d
    assert not any(isinstance(m, wrong_conv) for m in model.modules())

    called: list[str] = []
    outputs: dict[str, torch.Tensor] = {}

    def record(lname: str):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            called.append(lname)
            outputs[lname] = out

        return hook

    for lname, layer in layers:
        layer.register_forward_hook(record(lname))
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # weight layers run exactly in registration order: stem first, classifier head last
    assert list(dict.fromkeys(called)) == [n for n, _ in layers]
    first, last = layers[0][1], layers[-1][1]
    if name == "mlp5":
        assert type(first) is nn.Linear and first.in_features == math.prod(shape)
    else:
        conv = nn.Conv1d if len(shape) == 2 else nn.Conv2d
        assert type(first) is conv and first.in_channels == shape[0]
    assert type(last) is nn.Linear and last.out_features == 7
    assert outputs[layers[-1][0]] is out  # the head's output is the model's output

    out.square().mean().backward()
    params = list(model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize(
    "name,shape,params",
    [
        ("mlp5", (1, 40), 56_074),
        ("cnn1d", (1, 40), 19_562),
        ("resnet20", (1, 40), 93_914),
        ("resnet20", (3, 32, 32), 272_474),  # the paper's 0.27M
        ("resnet18", (3, 32, 32), 11_173_962),  # the usual CIFAR ResNet-18
        ("mobilenetv2", (3, 32, 32), 73_578),
        ("vit_tiny", (1, 40), 135_626),
        ("vit_tiny", (3, 32, 32), 141_898),
    ],
)
def test_default_sizes(name, shape, params):
    model = M.create(name, 10, shape)
    assert sum(p.numel() for p in model.parameters()) == params


def test_width_options_scale_the_models():
    assert M.create("mlp5", 10, (1, 40), width=16)[1].out_features == 16
    assert M.create("cnn1d", 10, (1, 40), width=8)[0].out_channels == 8
    assert M.create("resnet20", 10, (3, 32, 32), width=8).fc.in_features == 32
    assert M.create("resnet18", 10, (3, 32, 32), width=4).fc.in_features == 32
    small, wide = (M.create("mobilenetv2", 10, (3, 8, 8), width_mult=m) for m in (0.25, 1.0))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > 3 * count(small)
    vit = M.create("vit_tiny", 10, (3, 32, 32), dim=32, depth=2, heads=2, patch=8)
    assert vit.pos.shape == (1, 16, 32) and len(vit.blocks) == 2


def test_vit_patch_choice_and_depthwise_mobilenet():
    tokens = {s: M.create("vit_tiny", 10, s).pos.shape[1] for s in SHAPES}
    assert tokens == {(1, 40): 10, (1, 8, 8): 16, (3, 32, 32): 64}
    model = M.create("mobilenetv2", 10, (1, 40))
    dw = [m for m in model.modules() if isinstance(m, nn.Conv1d) and m.groups == m.in_channels > 1]
    assert len(dw) == 8
    full = M.create("mobilenetv2", 10, (3, 32, 32), depth="full", width_mult=0.25)
    assert len([m for m in full.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]) == 17
    assert full(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,shape,kwargs,match",
    [
        ("cnn1d", (3, 32, 32), {}, "needs 1-D inputs"),
        ("resnet20", (40,), {}, r"\(C, L\) or \(C, H, W\)"),
        ("mobilenetv2", (1, 3, 8, 8), {}, r"\(C, L\) or \(C, H, W\)"),
        ("vit_tiny", (3, 30, 30), {"patch": 4}, "must divide"),
        ("vit_tiny", (1, 40), {"dim": 30, "heads": 4}, "divisible by heads"),
        ("resnet", (3, 32, 32), {}, "did you mean"),
        ("mlp5", (1, 40), {"depth": 3}, "has no option 'depth'"),
        ("mobilenetv2", (3, 32, 32), {"depth": "huge"}, "'small' or 'full'"),
        ("resnet20", (3, 32, 32), {"width": 0}, "positive integer"),
        ("mlp5", (1, 0), {}, "input_shape"),
    ],
)
def test_mismatches_are_one_line_config_errors(name, shape, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        M.create(name, 10, shape, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="num_classes"):
        M.create("mlp5", 0, (1, 40))
