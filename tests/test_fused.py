"""The fused C++ kernels (qatlab/quant/fused.py, fused.cpp) against the ATen passes they replace.

Any per-tensor CPU float32 call takes the kernels: the forward output and the input gradient
must be bitwise equal to the ATen passes (``QATLAB_FUSED_KERNELS=0``), the step gradient equal
up to float32 rounding (summation order) and the same for any number of threads; backward
writes the input gradient over the incoming one only when nothing else holds that; a step held
at the floor gets none; second derivatives (``create_graph``) match the ATen passes;
other dtypes, strided tensors, per-channel steps, tracing and ``QATLAB_FUSED_KERNELS=0`` keep the
ATen passes; kernels that cannot be built warn once and give the ATen results. The first test
builds the extension (~20 s once per machine; cached by torch).
"""

from __future__ import annotations

import math

import pytest
import torch

from qatlab.quant import fused
from qatlab.quant.quantizer import _EPS, fake_quantize


def _run(x: torch.Tensor, step: float, n: int, p: int, g: torch.Tensor, floor=None):
    xr = x.clone().requires_grad_()
    s = torch.tensor(step, requires_grad=True)
    out = fake_quantize(xr, s, n, p, 0.01, floor)
    out.backward(g)
    return out.detach(), xr.grad, s.grad, type(out.grad_fn).__name__


@pytest.fixture
def big():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 128, 128, generator=gen) * 1.5  # 2^20 elements: 16 tasks
    return x, torch.randn(x.shape, generator=gen)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    monkeypatch.setattr(fused, "_broken", False)


def _exact_step_grad(x, g, step, n, p):
    """LSQ's step gradient in float64 and the sum of its terms' magnitudes."""
    x64, g64, s = x.double(), g.double(), float(torch.tensor(step))
    scaled = x64 / s
    levels = scaled.round().clamp(n, p)
    inside = (scaled > n - 0.5) & (scaled < p + 0.5)
    exact = 0.01 * float((g64 * levels).sum() - (g64 * inside * scaled).sum())
    scale = 0.01 * float((g64 * levels).abs().sum() + (g64 * inside * scaled).abs().sum())
    return exact, scale


@pytest.mark.parametrize("n,p", [(-2, 1), (-8, 7), (0, 15), (-128, 127), (0, 255)])
def test_fused_matches_aten_passes(big, monkeypatch, n, p):
    x, g = big
    got = _run(x, 0.137, n, p, g, _EPS)
    assert got[3] == "CppFunction"  # the C++ autograd Function
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.137, n, p, g, _EPS)
    assert want[3] == "_FakeQuantBackward"
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[2].shape == want[2].shape == () and got[2].dtype == torch.float32
    # the step gradient: both within float32 rounding of a float64 computation of LSQ's, on
    # the scale of its terms (a sum of ~1e6 products with cancellation; relative error of the
    # result itself can reach 1e-4 at 8 bits, for the ATen dot products as for the kernel)
    exact, scale = _exact_step_grad(x, g, 0.137, n, p)
    assert abs(float(got[2]) - exact) <= 2e-8 * scale
    assert abs(float(want[2]) - exact) <= 2e-8 * scale
    assert abs(float(got[2]) - exact) <= 1e-3 * abs(exact)


@pytest.mark.parametrize("size", [1, 15, 1000, 1025, 300_013])
def test_any_size_matches_aten_passes(monkeypatch, size):
    """Sizes off the 16 lanes, the 1,024-element flush and the 65,536-element task."""
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    got = _run(x, 0.05, -8, 7, g, _EPS)
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.05, -8, 7, g, _EPS)
    assert got[3] == "CppFunction" and want[3] == "_FakeQuantBackward"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    exact, scale = _exact_step_grad(x, g, 0.05, -8, 7)
    assert abs(float(got[2]) - exact) <= 6e-8 * scale  # float32's rounding of the result too


def test_step_gradient_does_not_depend_on_threads(big):
    x, g = big
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, 0.137, -8, 7, g, _EPS)
        torch.set_num_threads(3)  # chunks split unevenly over the threads
        three = _run(x, 0.137, -8, 7, g, _EPS)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:3], three[:3], strict=True):
        assert torch.equal(a, b)


def _backward_bytes(loss_backward) -> int:
    """Bytes the fused backward node allocated (profiler memory, children included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_backward()
    rows = [e for e in prof.key_averages() if e.key == "torch::autograd::CppNode<FakeQuantize>"]
    assert len(rows) == 1
    return rows[0].cpu_memory_usage


def test_input_gradient_reuses_a_gradient_nothing_else_holds():
    size = 1 << 16
    x = torch.randn(size, requires_grad=True)
    step = torch.tensor(0.1, requires_grad=True)
    g = torch.randn(size)
    g_before = g.clone()
    inside = torch.where((x > -0.85) & (x < 0.75), 1.0, 0.0).detach()

    # the gradient of ``2 * q`` is a fresh tensor only backward holds: dx is written over it
    out = fake_quantize(x, step, -8, 7, 0.01, _EPS)
    assert _backward_bytes(lambda: (out * 2.0).backward(g)) < size * 4
    assert torch.equal(x.grad, 2.0 * g * inside)

    # the caller's own gradient: a new tensor, and the caller's is untouched
    x.grad = None
    out = fake_quantize(x, step, -8, 7, 0.01, _EPS)
    assert _backward_bytes(lambda: out.backward(g)) >= size * 4
    assert torch.equal(g, g_before) and torch.equal(x.grad, g * inside)

    # one gradient for two quantizers (a sum's backward hands both the same tensor)
    x.grad = None
    other = torch.randn(size, requires_grad=True)
    both = fake_quantize(x, step, -8, 7, 0.01, _EPS) + fake_quantize(other, step, -8, 7, 0.01, _EPS)
    (both * 1.0).backward(g)
    assert torch.equal(x.grad, g * inside)
    assert torch.equal(other.grad, torch.where((other > -0.85) & (other < 0.75), g, 0.0))

    # a retained gradient keeps its value
    x.grad = None
    out = fake_quantize(x, step, -8, 7, 0.01, _EPS)
    out.retain_grad()
    (out * 3.0).sum().backward()
    assert torch.equal(out.grad, torch.full((size,), 3.0))
    assert torch.equal(x.grad, 3.0 * inside)


@pytest.mark.parametrize("step", [0.01, 0.0, -0.3, math.nan])
def test_step_held_at_floor_gets_no_gradient(big, monkeypatch, step):
    x, g = big
    out, grad_x, grad_step, kind = _run(x, step, 0, 15, g, floor=0.25)
    assert kind == "CppFunction"
    assert float(grad_step) == 0.0
    if step == step:  # held at the floor: quantized with 0.25
        levels = torch.round(x * (1.0 / 0.25)).clamp(0, 15)
        assert torch.equal(out, levels * 0.25)
        assert torch.equal(grad_x, torch.where((x > -0.125) & (x < 3.875), g, 0.0))
    else:  # a NaN step stays NaN, as clamp_min keeps it
        assert out.isnan().all()
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, step, 0, 15, g, floor=0.25)
    assert torch.equal(out, want[0]) or (out.isnan().all() and want[0].isnan().all())
    assert float(want[2]) == 0.0


def test_no_input_gradient_and_frozen_step(big):
    x, g = big
    step = torch.tensor(0.2, requires_grad=True)
    fake_quantize(x, step, -8, 7, 0.01, _EPS).backward(g)  # x needs no gradient
    assert x.grad is None and step.grad is not None and float(step.grad) != 0.0
    leaf = x.clone().requires_grad_()
    out = fake_quantize(leaf, torch.tensor(0.2), -8, 7, 0.01, _EPS)  # the step frozen
    assert type(out.grad_fn).__name__ == "CppFunction"
    out.backward(g)
    assert torch.equal(leaf.grad, torch.where((x > -1.7) & (x < 1.5), g, 0.0))


def test_second_derivatives_match_the_aten_passes(monkeypatch):
    """create_graph: the backward in differentiable ATen ops, as _FakeQuant's."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 18, generator=gen)

    def grads():
        leaf = x.clone().requires_grad_()
        step = torch.tensor(0.1, requires_grad=True)
        out = fake_quantize(leaf, step, -8, 7, 0.01, _EPS)
        loss = (out * out).sum()
        gx, gs = torch.autograd.grad(loss, (leaf, step), create_graph=True)
        (hvp,) = torch.autograd.grad((gx * gx).sum() + gs, leaf)
        return type(out.grad_fn).__name__, gx.detach(), gs.detach(), hvp

    got = grads()
    monkeypatch.setenv(fused.ENV, "0")
    want = grads()
    assert got[0] == "CppFunction" and want[0] == "_FakeQuantBackward"
    assert torch.equal(got[1], want[1])
    assert float(got[2]) == pytest.approx(float(want[2]), rel=1e-4)
    assert float(want[3].abs().sum()) > 0
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-5)


def test_small_and_other_tensors(monkeypatch):
    """Any size takes the kernels (a weight of 7 elements too); other dtypes, strided tensors,
    per-channel steps and ``torch.jit.trace`` keep the ATen passes."""
    step = torch.tensor(0.1)
    tiny = torch.tensor([-1.0, -0.26, -0.04, 0.05, 0.149, 0.151, 0.9])
    out, grad_x, grad_step, kind = _run(tiny, 0.1, -8, 7, torch.arange(1.0, 8.0))
    assert kind == "CppFunction"
    assert out.tolist() == pytest.approx([-0.8, -0.3, -0.0, 0.0, 0.1, 0.2, 0.7])
    # in range: -0.85 < x < 0.75; -1.0 and 0.9 are clipped
    assert grad_x.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]
    # LSQ: 0.01 * (sum g*levels - sum g*inside*x/s)
    levels = torch.tensor([-8.0, -3.0, -0.0, 0.0, 1.0, 2.0, 7.0])
    inside = torch.tensor([0.0, 1, 1, 1, 1, 1, 0])
    g = torch.arange(1.0, 8.0)
    want = 0.01 * float((g * levels).sum() - (g * inside * tiny / 0.1).sum())
    assert float(grad_step) == pytest.approx(want, rel=1e-5)
    empty = torch.zeros(0)
    assert _run(empty, 0.1, -8, 7, empty)[0].shape == (0,)
    assert not fused.applies(torch.randn(8, dtype=torch.float64), step)
    assert not fused.applies(torch.randn(16)[::2], step)
    assert not fused.applies(torch.randn(4, 8), torch.full((4,), 0.1))
    traced = torch.jit.trace(lambda t: fake_quantize(t, step, -8, 7), torch.randn(64))
    y = torch.randn(64)
    assert torch.equal(traced(y), (y * 10.0).round().clamp(-8, 7) * 0.1)  # recorded ATen ops
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.applies(torch.randn(8), step)


def test_unbuildable_kernels_warn_once_and_fall_back(big, monkeypatch):
    x, g = big
    monkeypatch.setenv(fused.ENV, "0")
    want = _run(x, 0.2, -8, 7, g)
    monkeypatch.delenv(fused.ENV)

    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions\nsecond line")

    monkeypatch.setattr(fused, "_build", broken)
    monkeypatch.setattr(fused, "_module", None)
    message = "fused fake-quant kernels unavailable \\(Ninja is required to load C\\+\\+ ext"
    with pytest.warns(RuntimeWarning, match=message):
        got = _run(x, 0.2, -8, 7, g)
    assert fused._broken and not fused.enabled()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])  # the ATen passes exactly: bitwise
    again = _run(x, 0.2, -8, 7, g)  # no second warning: kernels stay off for the process
    assert torch.equal(again[2], want[2])
