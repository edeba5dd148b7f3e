"""The fused one-pass eager kernels (qatlab/quant/fused.py) against the ATen passes they replace.

On a tensor large enough to take the fused path, the forward output and the input gradient must
be bitwise equal to the ATen passes (``QATLAB_FUSED_KERNELS=0``), the step gradient equal up
to float32 rounding (summation order); small tensors, other dtypes and
``QATLAB_FUSED_KERNELS=0`` keep the ATen passes; a kernel that cannot be built warns once and
gives the ATen results.
"""

from __future__ import annotations

import pytest
import torch

from qatlab.quant import fused
from qatlab.quant.quantizer import _EPS, fake_quantize


def _run(x: torch.Tensor, step: float, n: int, p: int, g: torch.Tensor, floor=None):
    xr = x.clone().requires_grad_()
    s = torch.tensor(step, requires_grad=True)
    out = fake_quantize(xr, s, n, p, 0.01, floor)
    out.backward(g)
    return out.detach(), xr.grad, s.grad


@pytest.fixture
def big():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 128, 128, generator=gen) * 1.5  # 1,048,576 elements = MIN_NUMEL
    assert x.numel() >= fused.MIN_NUMEL
    return x, torch.randn(x.shape, generator=gen)


def _count_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = fused._run

    def counting(name, *args):
        calls.append(name)
        return real(name, *args)

    monkeypatch.setattr(fused, "_run", counting)
    return calls


@pytest.mark.parametrize("n,p", [(-2, 1), (-8, 7), (0, 15), (-128, 127), (0, 255)])
def test_fused_matches_aten_passes(big, monkeypatch, n, p):
    x, g = big
    calls = _count_calls(monkeypatch)
    got = _run(x, 0.137, n, p, g, _EPS)
    assert calls == ["forward", "backward"]
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.137, n, p, g, _EPS)
    assert calls == ["forward", "backward"]  # no further fused call with the variable at 0
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[2].shape == want[2].shape == ()
    # the step gradient: both within float32 rounding of a float64 computation of LSQ's, on
    # the scale of its terms (a sum of ~1e6 products with cancellation; relative error of the
    # result itself can reach 1e-4 at 8 bits, for the ATen dot products as for the kernel)
    x64, g64, s = x.double(), g.double(), float(torch.tensor(0.137))
    scaled = x64 / s
    levels = scaled.round().clamp(n, p)
    inside = (scaled > n - 0.5) & (scaled < p + 0.5)
    exact = 0.01 * float((g64 * levels).sum() - (g64 * inside * scaled).sum())
    scale = 0.01 * float((g64 * levels).abs().sum() + (g64 * inside * scaled).abs().sum())
    assert abs(float(got[2]) - exact) <= 2e-8 * scale
    assert abs(float(want[2]) - exact) <= 2e-8 * scale
    assert abs(float(got[2]) - exact) <= 1e-3 * abs(exact)


def test_fused_step_held_at_floor_gets_no_gradient(big, monkeypatch):
    x, g = big
    calls = _count_calls(monkeypatch)
    out, grad_x, grad_step = _run(x, 0.01, 0, 15, g, floor=0.25)
    assert calls == ["forward"]  # no step gradient: backward is the one-pass hardtanh_backward
    assert float(grad_step) == 0.0
    levels = torch.round(x * (1.0 / 0.25)).clamp(0, 15)
    assert torch.equal(out, levels * 0.25)
    assert torch.equal(grad_x, torch.where((x > -0.125) & (x < 3.875), g, 0.0))


def test_small_and_other_tensors_keep_the_aten_passes(monkeypatch):
    calls = _count_calls(monkeypatch)
    small = torch.randn(fused.MIN_NUMEL - 1)
    _run(small, 0.1, -8, 7, torch.ones_like(small))
    big64 = torch.randn(fused.MIN_NUMEL, dtype=torch.float64)
    _run(big64, 0.1, -8, 7, torch.ones_like(big64))
    strided = torch.randn(2 * fused.MIN_NUMEL)[::2]
    assert not fused.applies(strided)
    assert calls == []
    assert fused.applies(torch.randn(fused.MIN_NUMEL))
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.applies(torch.randn(fused.MIN_NUMEL))


def test_unbuildable_kernel_warns_once_and_falls_back(big, monkeypatch):
    x, g = big
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.2, -8, 7, g)
    monkeypatch.delenv(fused.ENV)

    def broken(name):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(fused, "_kernel", broken)
    monkeypatch.setattr(fused, "_broken", False)
    message = "fused fake-quant kernels unavailable \\(no C\\+\\+ compiler found\\)"
    with pytest.warns(RuntimeWarning, match=message):
        got = _run(x, 0.2, -8, 7, g)
    assert fused._broken and not fused.enabled()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])  # the ATen passes exactly: bitwise
    again = _run(x, 0.2, -8, 7, g)  # no second warning: kernels stay off for the process
    assert torch.equal(again[2], want[2])


def _forward_only(real):
    return lambda name, *args: real(name, *args) if name == "forward" else None


def test_failed_fused_backward_recomputes_the_levels(big, monkeypatch):
    """Forward fused, backward kernel broken: the step gradient from levels recomputed from x."""
    x, g = big
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.2, -8, 7, g)
    monkeypatch.delenv(fused.ENV)
    monkeypatch.setattr(fused, "_broken", False)
    real = fused._run
    monkeypatch.setattr(fused, "_run", _forward_only(real))
    got = _run(x, 0.2, -8, 7, g)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
