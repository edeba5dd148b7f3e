"""qatlab/quant/fused.py's definitions on hand-made input, without compiling anything.

The kernels' formulas run eagerly here (``_kernel`` patched to return the plain functions), so
these tests are fast and mutmut can run them (``make mutants``; a mutated function cannot be
traced by ``torch.compile`` with ``fullgraph``). ``tests/test_fused.py`` checks the compiled
kernels against the ATen passes.
"""

from __future__ import annotations

import math

import pytest
import torch

from qatlab.quant import fused
from qatlab.quant.quantizer import _FakeQuant, fake_quantize

# s = 0.5 on the signed 2-bit grid [-2, 1]: levels round(2x) clamped, in range (-1.25, 0.75)
X = torch.tensor([-2.0, -1.3, -0.76, -0.25, 0.0, 0.24, 0.26, 0.74, 0.76, 3.0])
LEVELS = torch.tensor([-2.0, -2.0, -2.0, -0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
INSIDE = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
G = torch.arange(1.0, 11.0)


@pytest.fixture
def eager_kernels(monkeypatch):
    """``_kernel`` returns the plain functions; every call recorded; the bar at 4 elements."""
    calls: list[str] = []

    def kernel(name):
        calls.append(name)
        return fused._forward if name == "forward" else fused._backward

    monkeypatch.setattr(fused, "_kernel", kernel)
    monkeypatch.setattr(fused, "MIN_NUMEL", 4)
    monkeypatch.setattr(fused, "_broken", False)
    monkeypatch.delenv(fused.ENV, raising=False)
    return calls


def test_constants_by_hand():
    assert fused.constants(0.5, -2, 1).tolist() == [2.0, 0.5, -2.0, 1.0, -1.25, 0.75]
    assert fused.constants(0.25, 0, 15).tolist() == [4.0, 0.25, 0.0, 15.0, -0.125, 3.875]
    c = fused.constants(0.1, -8, 7)  # each value rounded from double to float32
    want = [10.0, 0.1, -8.0, 7.0, -0.85, 0.75]
    assert c.tolist() == [float(torch.tensor(v, dtype=torch.float32)) for v in want]
    assert c.dtype == torch.float32 and c.shape == (6,)
    assert fused.constants(0.0, 0, 3)[0] == math.inf
    assert fused.constants(-0.0, 0, 3)[0] == -math.inf


def test_forward_and_backward_formulas_by_hand():
    c = fused.constants(0.5, -2, 1)
    assert torch.equal(fused._forward(X, c), LEVELS * 0.5)
    grad_x, levels_sum, inner = fused._backward(G, X, c)
    assert torch.equal(grad_x, G * INSIDE)  # in range: -1.25 < x < 0.75, both ends open
    assert float(levels_sum) == float((G * LEVELS).sum()) == 22.0  # -2-4-6 +7+8+9+10
    assert float(inner) == pytest.approx(float((G * INSIDE * X).sum()))
    # by hand: 3*(-0.76) + 4*(-0.25) + 5*0 + 6*0.24 + 7*0.26 + 8*0.74 = 5.90
    assert float(inner) == pytest.approx(5.90, abs=1e-5)
    edges = torch.tensor([-1.25, 0.75])  # exactly on the bounds: outside
    assert fused._backward(torch.ones(2), edges, c)[0].tolist() == [0.0, 0.0]


def test_applies_condition_by_condition(monkeypatch):
    monkeypatch.setattr(fused, "MIN_NUMEL", 8)
    monkeypatch.setattr(fused, "_broken", False)
    monkeypatch.delenv(fused.ENV, raising=False)
    assert fused.applies(torch.zeros(8)) and fused.applies(torch.nn.Parameter(torch.zeros(8)))
    assert not fused.applies(torch.zeros(7))
    assert not fused.applies(torch.zeros(8, dtype=torch.float64))
    assert not fused.applies(torch.zeros(16)[::2])

    class Sub(torch.Tensor):
        pass

    assert not fused.applies(torch.zeros(8).as_subclass(Sub))
    for off in ("0", "false", "no", "off"):
        monkeypatch.setenv(fused.ENV, off)
        assert not fused.enabled() and not fused.applies(torch.zeros(8))
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.enabled()
    monkeypatch.setattr(fused, "_broken", True)
    assert not fused.enabled()


def test_kernel_is_the_compiled_function_built_once(monkeypatch):
    monkeypatch.setattr(fused, "_kernels", {})
    built = []

    def fake_compile(function, **options):
        built.append((function, options))
        return lambda *args: function(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    first = fused._kernel("forward")
    assert fused._kernel("forward") is first
    fused._kernel("backward")
    assert [b[0] for b in built] == [fused._forward, fused._backward]
    assert built[0][1] == {"dynamic": True, "fullgraph": True}


def test_shapes_and_failure_fallback(eager_kernels, monkeypatch):
    x = X.reshape(2, 5)
    c = fused.constants(0.5, -2, 1)
    out = fused.forward(x, c)
    assert out.shape == (2, 5) and torch.equal(out, (LEVELS * 0.5).reshape(2, 5))
    grad_x, levels_sum, inner = fused.backward(G.reshape(2, 5), x, c)
    assert grad_x.shape == (2, 5) and float(levels_sum) == 22.0
    assert eager_kernels == ["forward", "backward"]

    def broken(name):
        raise RuntimeError("  first line of the failure \nsecond")

    monkeypatch.setattr(fused, "_kernel", broken)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(first line of the failure\);"):
        assert fused.forward(x, c) is None
    assert fused._broken
    monkeypatch.setattr(fused, "_broken", False)

    def silent(name):
        raise ValueError()

    monkeypatch.setattr(fused, "_kernel", silent)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(ValueError\);"):
        assert fused.backward(G, X, c) is None


def _grads(x, step_value, n, p, g, floor=None):
    leaf = x.clone().requires_grad_()
    step = torch.tensor(step_value, requires_grad=True)
    out = fake_quantize(leaf, step, n, p, 0.1, floor)
    out.backward(g)
    return out.detach(), leaf.grad, step.grad


def test_fake_quant_takes_the_fused_path_with_lsq_gradients(eager_kernels, monkeypatch):
    out, grad_x, grad_step = _grads(X, 0.5, -2, 1, G)
    assert eager_kernels == ["forward", "backward"]
    assert torch.equal(out, LEVELS * 0.5)
    assert torch.equal(grad_x, G * INSIDE)
    # LSQ: 0.1 * (sum g*levels - sum g*inside*x/s) = 0.1 * (22 - 5.90/0.5) = 1.02
    assert float(grad_step) == pytest.approx(1.02, abs=1e-5)
    monkeypatch.setenv(fused.ENV, "0")  # the ATen passes agree
    aten = _grads(X, 0.5, -2, 1, G)
    assert eager_kernels == ["forward", "backward"]
    assert torch.equal(aten[0], out) and torch.equal(aten[1], grad_x)
    assert float(aten[2]) == pytest.approx(float(grad_step), abs=1e-6)


def test_fused_path_edges(eager_kernels, monkeypatch):
    # a step held at the floor: no fused backward, no step gradient, dx by hardtanh_backward
    out, grad_x, grad_step = _grads(X, 0.1, -2, 1, G, floor=0.5)
    assert eager_kernels == ["forward"]
    assert torch.equal(out, LEVELS * 0.5) and torch.equal(grad_x, G * INSIDE)
    assert float(grad_step) == 0.0
    # no gradient wanted for x: None for it, the step's still computed
    eager_kernels.clear()
    step = torch.tensor(0.5, requires_grad=True)
    fake_quantize(X, step, -2, 1, 0.1).backward(G)
    assert eager_kernels == ["forward", "backward"]
    assert float(step.grad) == pytest.approx(1.02, abs=1e-5)
    # a forward that fell back: ATen from then on, and the same answer
    eager_kernels.clear()
    real_run = fused._run

    def failing(which):
        return lambda name, *args: None if name == which else real_run(name, *args)

    monkeypatch.setattr(fused, "_run", failing("forward"))
    out2, grad_x2, grad_step2 = _grads(X, 0.5, -2, 1, G)
    assert eager_kernels == []
    assert torch.equal(out2, LEVELS * 0.5) and torch.equal(grad_x2, G * INSIDE)
    assert float(grad_step2) == pytest.approx(1.02, abs=1e-5)
    # forward fused, backward fell back: levels recomputed from x
    monkeypatch.setattr(fused, "_run", failing("backward"))
    out3, grad_x3, grad_step3 = _grads(X, 0.5, -2, 1, G)
    assert eager_kernels == ["forward"]
    assert torch.equal(out3, LEVELS * 0.5) and torch.equal(grad_x3, G * INSIDE)
    assert float(grad_step3) == pytest.approx(1.02, abs=1e-5)


def test_context_of_the_fused_forward(eager_kernels):
    """What forward leaves for backward: the Python step, the constants, no saved output."""

    class Ctx:
        def save_for_backward(self, *tensors):
            self.saved = tensors

    ctx = Ctx()
    step = torch.tensor(0.5)
    out = _FakeQuant.forward(ctx, X, step, -2, 1, 0.1)
    assert ctx.s == 0.5 and ctx.held is False
    assert ctx.consts.tolist() == [2.0, 0.5, -2.0, 1.0, -1.25, 0.75]
    assert ctx.saved[0] is X and ctx.saved[1] is step and ctx.saved[2] is None
    assert torch.equal(out, LEVELS * 0.5)
    small = torch.tensor([0.3, 0.6, 0.9])  # below the bar of 4: the ATen passes, output saved
    ctx2 = Ctx()
    out2 = _FakeQuant.forward(ctx2, small, step, -2, 1, 0.1)
    assert ctx2.consts is None and ctx2.saved[2] is out2


def test_constants_are_float32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        c = fused.constants(0.1, -8, 7)
    finally:
        torch.set_default_dtype(previous)
    assert c.dtype == torch.float32 and float(c[1]) == float(torch.tensor(0.1).float())


def test_fused_backward_called_directly_honours_needs_input_grad(eager_kernels):
    class Ctx:
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    for needs, want_dx in (((False, True), False), ((True, True), True)):
        ctx = Ctx()
        _FakeQuant.forward(ctx, X, torch.tensor(0.5), -2, 1, 0.1)
        ctx.needs_input_grad = (*needs, False, False, False)
        grad_x, grad_step, *tail = _FakeQuant.backward(ctx, G)
        assert tail == [None, None, None]
        assert float(grad_step) == pytest.approx(1.02, abs=1e-5)
        assert (grad_x is not None) == want_dx
        if want_dx:
            assert torch.equal(grad_x, G * INSIDE)


def test_per_tensor_quantize_by_hand():
    from qatlab.quant.quantizer import _per_tensor_quantize

    assert torch.equal(_per_tensor_quantize(X, 0.5, -2, 1), LEVELS * 0.5)
    y = torch.tensor([-0.3, 0.7, 1.6, 9.0])
    assert _per_tensor_quantize(y, 0.5, 0, 3).tolist() == [0.0, 0.5, 1.5, 1.5]
    # s = 0: 1/s = inf, x * inf clamps to the ends, times 0; the sign of zero kept
    assert _per_tensor_quantize(torch.tensor([-1.0, 1.0]), 0.0, -2, 1).tolist() == [-0.0, 0.0]
    z = _per_tensor_quantize(torch.tensor([1.0]), -0.0, -2, 1)  # 1 * -inf -> -2 * -0 = +0
    assert z.item() == 0.0 and math.copysign(1.0, z.item()) == 1.0
    assert torch.equal(y, torch.tensor([-0.3, 0.7, 1.6, 9.0]))  # x itself untouched
