"""Speed work on the eager fake quantizer must not change a single bit.

``_Frozen`` is a verbatim copy of the eager kernel (``qatlab.quant.quantizer._FakeQuant``) as
of main ``9d9cdbf`` (2026-12-02), the kernel every published run used. A small conv net with
depthwise layers (the case that made the kernel hand-tuned: MobileNetV2's many small layers),
quantized per tensor and per channel at 2, 4 and 8 bits, runs forward and backward once with
the library and once with ``fake_quantize`` routed to the frozen copy: outputs and the
gradients of the input, the latent weights and every step size must be bitwise equal
(``torch.equal``). A faster kernel passes this test or is a different kernel.

With the fused C++ kernels on (the default, :mod:`qatlab.quant.fused`) everything but the
per-tensor step gradients stays bitwise equal; those add their terms in another order (float32
rounding, checked here to 1e-5 of the gradient's scale). ``QATLAB_FUSED_KERNELS=0`` keeps the
frozen kernel's every bit, for reproducing runs made before the kernels.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import qatlab
import qatlab.quant.quantizer as quantizer_module
from qatlab.quant import fused, quantizers
from qatlab.quant.layers import quant_layers


class _Frozen(torch.autograd.Function):
    """``qatlab.quant.quantizer._FakeQuant`` at ``9d9cdbf``, unchanged but for names."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, n: int, p: int, grad_scale: float, floor=None):
        ctx.n, ctx.p, ctx.grad_scale, ctx.nargs = n, p, grad_scale, 5 if floor is None else 6
        ctx.floor = floor
        if step.dim() == 0 and x.device.type == "cpu":
            s, ctx.held = _frozen_cpu_step(step, floor)
            out = torch.mul(x, 1.0 / s if s != 0 else math.copysign(math.inf, s))
            out.round_().clamp_(float(n), float(p)).mul_(s)
            ctx.s = s
            ctx.save_for_backward(x, step, out)
            return out
        ctx.s = None
        clamped = step if floor is None else step.clamp_min(floor)
        s = _bcast(clamped, x)
        out = torch.mul(x, s.reciprocal())
        out.round_().clamp_(float(n), float(p)).mul_(s)
        ctx.save_for_backward(x, step, None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step, out = ctx.saved_tensors
        n, p = ctx.n, ctx.p
        grad_step = None
        tail = (None,) * (ctx.nargs - 2)
        s = ctx.s
        if s is not None:
            step_grad = ctx.needs_input_grad[1] and not ctx.held
            outer = torch.dot(grad.reshape(-1), out.reshape(-1)) if step_grad else None
            grad_x = torch.ops.aten.hardtanh_backward(grad, x, (n - 0.5) * s, (p + 0.5) * s)
            if step_grad:
                inner = torch.dot(grad_x.reshape(-1), x.reshape(-1))
                grad_step = outer.sub_(inner).mul_(ctx.grad_scale / s)
            elif ctx.needs_input_grad[1]:
                grad_step = torch.zeros_like(step)
            return (grad_x if ctx.needs_input_grad[0] else None), grad_step, *tail
        floor = ctx.floor
        s = _bcast(step if floor is None else step.clamp_min(floor), x)
        scaled = torch.mul(x, s.reciprocal())
        grad_x = torch.ops.aten.hardtanh_backward(grad, scaled, n - 0.5, p + 0.5)
        if ctx.needs_input_grad[1]:
            if step.dim() == 0:
                inner = torch.dot(grad_x.reshape(-1), scaled.reshape(-1))
                levels = scaled.round_().clamp_(float(n), float(p))
                grad_step = torch.dot(grad.reshape(-1), levels.reshape(-1)) - inner
            else:
                rows = step.numel()
                inner = (grad_x * scaled).reshape(rows, -1).sum(1)
                levels = scaled.round_().clamp_(float(n), float(p))
                grad_step = (grad * levels).reshape(rows, -1).sum(1) - inner
            grad_step = grad_step * ctx.grad_scale
            if floor is not None:
                grad_step = torch.where(step >= floor, grad_step, 0.0)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_step, *tail


def _frozen_cpu_step(step: Tensor, floor: float | None) -> tuple[float, bool]:
    s = float(step)
    if floor is None or s >= float(torch.tensor(floor, dtype=torch.float32)):
        return s, False
    return (s if s != s else float(torch.tensor(floor, dtype=torch.float32))), True


def _bcast(step: Tensor, x: Tensor) -> Tensor:
    return step if step.dim() == 0 else step.reshape(-1, *([1] * (x.dim() - 1)))


def _frozen_fake_quantize(x, step, n, p, grad_scale=1.0, floor=None):
    if floor is None:
        return _Frozen.apply(x, step, n, p, grad_scale)
    return _Frozen.apply(x, step, n, p, grad_scale, floor)


def _depthwise_net() -> nn.Sequential:
    """Stem, an inverted-residual-like block (1x1 expand, 3x3 depthwise, 1x1 project), linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 24, 1, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU6(),
        nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU6(),
        nn.Conv2d(24, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _run(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Output, input gradient and every parameter gradient of one forward/backward."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "dx": x.grad, **grads}


@pytest.mark.parametrize("kernels", ["aten", "fused"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eager_kernel_is_bitwise_equal_to_frozen_copy(monkeypatch, granularity, bits, kernels):
    if kernels == "aten":
        monkeypatch.setenv(fused.ENV, "0")
    else:
        monkeypatch.delenv(fused.ENV, raising=False)
    torch.manual_seed(0)
    x = torch.randn(6, 3, 12, 12)
    y = torch.randint(0, 10, (6,))
    cfg = qatlab.QuantConfig(
        weight_bits=bits,
        act_bits=bits,
        weight_granularity=granularity,
        first_layer="same",
        last_layer="same",
    )
    model = qatlab.quantize(_depthwise_net(), cfg)
    qatlab.calibrate(model, [x])
    model.train()
    # the last weight step below the kernel's 1e-8 floor: the held path (no step gradient) too
    layers = [layer for _, layer in quant_layers(model)]
    assert len(layers) == 5
    with torch.no_grad():
        layers[-1].weight_quantizer.step.fill_(1e-9)
    reference = copy.deepcopy(model)

    got = _run(model, x, y)
    calls = []

    def frozen(*args, **kwargs):
        calls.append(args[1].dim())
        return _frozen_fake_quantize(*args, **kwargs)

    monkeypatch.setattr(quantizer_module, "fake_quantize", frozen)
    want = _run(reference, x, y)
    # the reference really ran the frozen copy, once per quantizer, per channel where asked
    assert len(calls) == 10
    assert sum(calls) == (5 if granularity == "channel" else 0)

    steps = [name for name, _ in quantizers(model)]
    assert len(steps) == 10  # weight and input quantizer of every layer
    assert got.keys() == want.keys()
    assert sum(k.endswith(".step") for k in got) == 10
    for key in want:
        if kernels == "fused" and key.endswith(".step") and got[key].dim() == 0:
            # the C++ loop's order of summation: float32 rounding of the step gradient
            assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-7), key
        else:
            assert torch.equal(got[key], want[key]), key
    held = layers[-1].weight_quantizer
    name = next(k for k, q in quantizers(model) if q is held)
    assert not got[f"{name}.step"].any()  # held at the floor: no step gradient
    assert sum(bool(got[k].ne(0).any()) for k in got if k.endswith(".step")) == 9
