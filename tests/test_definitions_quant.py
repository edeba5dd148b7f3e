"""More of the quantizer's definitions on hand-made input (``make mutants``, see
docs/results/mutation.md): the traceable form ``torch.compile`` uses, the accelerator form of
the LSQ backward (called directly with the context it would get), a zero, NaN or floor-equal
step, the 1e-8 floor of a learned step inside ``Quantizer.forward``, ties in the MSE search
across chunks, shapes, and the extra state a checkpoint carries.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from qatlab.quant import guard
from qatlab.quant.quantizer import Quantizer, _f32, _FakeQuant, fake_quantize, static_step

# x / s at s = 0.5 (4 bit, n = -8, p = 7): [-18.4, -1.2, 0.4, 1.48, 6.2, 16] -> levels
# [-8, -1, 0, 1, 6, 7]; inside (-8.5 < x/s < 7.5): the middle four; g = 1..6.
_X = [-9.2, -0.6, 0.2, 0.74, 3.1, 8.0]
_G = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
_OUT = [-4.0, -0.5, 0.0, 0.5, 3.0, 3.5]
_GX = [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]
# sum g*levels - sum (g*inside) x/s = 66 - 35.72 = 30.28
_GS = (-8 - 2 + 0 + 4 + 30 + 42) - (2 * -1.2 + 3 * 0.4 + 4 * 1.48 + 5 * 6.2)


def test_traceable_form_while_compiling(monkeypatch):
    """Under ``torch.compile`` (faked here: ``is_compiling`` is True) ``fake_quantize`` uses the
    out-of-place form, with ``step.clamp_min(floor)`` in front of it: same values, LSQ's
    gradients times ``grad_scale``, none for a step held at the floor."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.tensor(_X, requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    out = fake_quantize(x, step, -8, 7, 0.5, floor=1e-8)
    assert out.tolist() == pytest.approx(_OUT)
    (out * torch.tensor(_G)).sum().backward()
    assert x.grad.tolist() == _GX
    assert step.grad.item() == pytest.approx(0.5 * _GS, rel=1e-6)
    # no floor: the step as it is; default grad_scale 1
    step = torch.tensor(0.5, requires_grad=True)
    (fake_quantize(torch.tensor(_X), step, -8, 7) * torch.tensor(_G)).sum().backward()
    assert step.grad.item() == pytest.approx(_GS, rel=1e-6)
    # a step below the floor: quantized at the floor, no step gradient
    step = torch.tensor(0.1, requires_grad=True)
    out = fake_quantize(torch.tensor([0.3, -0.6, 2.0]), step, -4, 3, 1.0, floor=0.25)
    assert out.tolist() == [0.25, -0.5, 0.75]
    out.sum().backward()
    assert step.grad.item() == 0.0


class _Ctx(SimpleNamespace):
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _recompute_ctx(x, step, floor, grad_scale=0.5, needs=(True, True)):
    """The context ``_FakeQuant.forward`` leaves off the CPU (``ctx.s`` None: recompute x/s)."""
    return _Ctx(n=-8, p=7, grad_scale=grad_scale, nargs=5 if floor is None else 6, floor=floor,
                s=None, saved_tensors=(x, step, None), needs_input_grad=needs)  # fmt: skip


def test_lsq_backward_off_the_cpu_form_by_hand():
    """The per-tensor branch of the backward that recomputes ``x / s`` (taken on accelerators,
    where reading the step as a number would sync): LSQ's gradients by hand."""
    x, g = torch.tensor(_X), torch.tensor(_G)
    for floor in (None, 1e-8):
        got = _FakeQuant.backward(_recompute_ctx(x, torch.tensor(0.5), floor), g.clone())
        assert len(got) == (5 if floor is None else 6) and got[2:] == (None,) * len(got[2:])
        assert got[0].tolist() == _GX
        assert got[1].item() == pytest.approx(0.5 * _GS, rel=1e-6)
    # the step at the floor exactly still gets its gradient (clamp_min's rule); below: none
    f = _f32(0.25)
    at = _FakeQuant.backward(_recompute_ctx(x, torch.tensor(f), 0.25), g.clone())[1]
    ref = torch.tensor(f, requires_grad=True)
    (fake_quantize(x, ref, -8, 7, 0.5) * g).sum().backward()
    assert at.item() == pytest.approx(ref.grad.item(), rel=1e-6) and at.item() != 0.0
    below = _FakeQuant.backward(_recompute_ctx(x, torch.tensor(0.1), 0.25), g.clone())[1]
    assert below.item() == 0.0
    # only the gradients asked for
    got = _FakeQuant.backward(_recompute_ctx(x, torch.tensor(0.5), None, needs=(False, True)), g)
    assert got[0] is None and got[1].item() == pytest.approx(0.5 * _GS, rel=1e-6)
    got = _FakeQuant.backward(_recompute_ctx(x, torch.tensor(0.5), None, needs=(True, False)), g)
    assert got[0].tolist() == _GX and got[1] is None


def test_cpu_backward_returns_only_the_gradients_asked_for():
    ctx = _Ctx()
    x, step = torch.tensor(_X), torch.tensor(0.5)
    _FakeQuant.forward(ctx, x, step, -8, 7, 0.5)
    assert ctx.s == 0.5 and ctx.nargs == 5
    ctx.needs_input_grad = (False, True)
    got = _FakeQuant.backward(ctx, torch.tensor(_G))
    assert len(got) == 5 and got[0] is None
    assert got[1].item() == pytest.approx(0.5 * _GS, rel=1e-6)
    ctx = _Ctx()
    _FakeQuant.forward(ctx, x, step, -8, 7, 0.5, 1e-8)
    assert ctx.nargs == 6
    ctx.needs_input_grad = (True, False)
    got = _FakeQuant.backward(ctx, torch.tensor(_G))
    assert len(got) == 6 and got[0].tolist() == _GX and got[1] is None


def test_zero_nan_and_floor_equal_steps():
    x = torch.tensor([-2.0, 0.5, 3.0])
    # step 0 without a floor: x / 0 = +-inf, clipped to n or p, times 0 -> 0 (as x * (1/s) * s)
    assert fake_quantize(x, torch.tensor(0.0), -8, 7).tolist() == [0.0, 0.0, 0.0]
    neg0 = fake_quantize(x, torch.tensor(-0.0), -8, 7)  # 1/-0 = -inf: the signs flip
    assert neg0.tolist() == [0.0, 0.0, 0.0]
    assert [math.copysign(1, v) for v in neg0.tolist()] == [-1.0, 1.0, 1.0]
    # a NaN step stays NaN through the floor (clamp_min propagates NaN)
    out = fake_quantize(x, torch.tensor(math.nan), -8, 7, 1.0, 0.25)
    assert all(v != v for v in out.tolist())
    # a step equal to the floor is not held: it gets clamp_min's gradient
    f = _f32(0.25)
    step = torch.tensor(f, requires_grad=True)
    ref = torch.tensor(f, requires_grad=True)
    fake_quantize(x, step, -4, 3, 1.0, 0.25).sum().backward()
    fake_quantize(x, ref, -4, 3, 1.0).sum().backward()
    assert step.grad.item() == ref.grad.item() != 0.0


@pytest.mark.parametrize("scale", ["lsq", "lsq+"])
def test_quantizer_floors_a_learned_step_at_1e_8(scale):
    """A learned step at 0 or below quantizes with 1e-8 (``current_step``'s floor), inside
    ``forward``: x = [1, -1e-7] at 3 bit, x / 1e-8 = [1e8, -10] -> [p, max(n, -10)] * 1e-8:
    [3e-8, -4e-8] signed (lsq), [7e-8, 0] unsigned (lsq+, offset 0)."""
    q = Quantizer(3, scale=scale)
    with torch.no_grad():
        q.step.fill_(-1.0)
        q.initialized.fill_(True)
    q._ready = None
    n, p = q.grid_range
    x = torch.tensor([1.0, -1e-7])
    out = q(x)
    expected = [p * 1e-8, max(n, -10) * 1e-8]
    assert out.tolist() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        q.step.fill_(0.0)
    assert q(x).tolist() == pytest.approx(expected, rel=1e-5)


def test_mse_ties_keep_the_first_candidate_across_chunks():
    # all-zero rows: every candidate has error 0; the first (T = max|x| / 100, max|x| floored
    # at 1e-8) wins, also when the candidates are searched in chunks (numel > 2^24 / 100)
    for size in (4, 170_000):
        got = static_step(torch.zeros(size), "mse", -8, 7)
        assert got.item() == pytest.approx(0.01 * 1e-8 / 7, rel=1e-5), size


def test_mse_search_with_a_zero_in_the_data():
    # x = [0, 0.1, 0.2, 0.3, 2]: a zero must not make the search give up (no step 0 is tried);
    # the search written out over T_k = k/100 max|x|, k = 1..100, 4 bit (best: T = 1, s = 2/7)
    x = torch.tensor([0.0, 0.1, 0.2, 0.3, 2.0])
    errs = []
    for k in range(1, 101):
        s = k / 100 * 2.0 / 7
        errs.append((sum((min(max(round(v / s), -8), 7) * s - v) ** 2 for v in x.tolist()), s))
    best = min(errs, key=lambda e: e[0])[1]
    assert best == pytest.approx(2 / 7)
    assert static_step(x, "mse", -8, 7).item() == pytest.approx(best, rel=1e-5)


def test_per_tensor_steps_are_0_d():
    x = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    q = Quantizer(4, scale="maxabs_ste")
    assert q.current_step(x, grad=True).shape == () and q.current_step(x).shape == ()
    assert q.current_step(x, grad=True).item() == pytest.approx(2 / 7)
    assert q.current_step(x.requires_grad_()).requires_grad is False  # grad=False by default
    lsq = Quantizer(4)
    assert lsq.broadcast_step(x).shape == () and lsq.broadcast_step(x[0]).shape == ()
    assert lsq.integer(torch.tensor(2.6)).shape == ()
    chan = Quantizer(4, channels=2)
    assert chan.broadcast_step(x).shape == (2, 1)


def test_extra_state_round_trip():
    q = Quantizer(3, signed=False)
    q.fixed_bits = True
    assert q.get_extra_state() == {"bits": 3, "signed": False, "fixed_bits": True}
    other = Quantizer(5, signed=True)
    other.load_state_dict(q.state_dict())
    assert (other.bits, other.signed, other.fixed_bits) == (3, False, True)
    assert other._ready is None  # re-read on the next forward
    other.set_extra_state({"bits": 6, "signed": "auto"})  # a checkpoint from before fixed_bits
    assert (other.bits, other.signed, other.fixed_bits) == (6, "auto", False)
    assert other.fixed_bits is False


def test_settle_reads_initialized_only_after_a_load():
    q = Quantizer(4)
    with torch.no_grad():
        q.initialized.fill_(True)
    q._ready = False
    q.settle()
    assert q._ready is False  # only a just-loaded quantizer (None) re-reads the buffer
    q._ready = None
    q.settle()
    assert q._ready is True
    q.initialized.fill_(False)
    q._ready = None
    q.settle()
    assert q._ready is False


def test_extra_repr():
    assert Quantizer(4).extra_repr() == "bits=4, grid=[-8,7], policy=lsq, enabled=True"
    q = Quantizer(3, grid="restricted", scale="minmax", channels=5)
    q.enabled = False
    assert q.extra_repr() == "bits=3, grid=[-3,3], policy=minmax, channels=5, enabled=False"


def test_deep_copy_keeps_the_step_guarded():
    q = Quantizer(4)
    q._guard_label = "layer.weight_quantizer"
    guard.mark(q)
    attr = guard._ATTR
    assert getattr(q.step, attr) == "layer.weight_quantizer"
    twin = copy.deepcopy(q)
    assert twin.step is not q.step and getattr(twin.step, attr) == "layer.weight_quantizer"
    assert twin.bits == 4 and torch.equal(twin.step, q.step)


def _slow(q: Quantizer, x: torch.Tensor, g: torch.Tensor):
    """Output and gradients of ``q`` on ``x`` through ``forward`` (a plan settled on earlier
    calls, maybe for another shape, is what it meets first), twice, and through the full path
    (``_forward``) of a deep copy: all three must agree bitwise. Returns the full path's."""
    reference = copy.deepcopy(q)
    results = []
    for quantizer, call in ((q, q.forward), (q, q.forward), (reference, reference._forward)):
        xr = x.clone().requires_grad_()
        quantizer.step.grad = None
        out = call(xr)
        out.backward(g)
        step_grad = None if quantizer.step.grad is None else quantizer.step.grad.clone()
        results.append((out.detach(), xr.grad, step_grad))
    for got in results[:2]:
        for a, b in zip(got, results[2], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    return results[2]


def test_forward_plan_matches_the_full_path_through_every_change():
    """The fast path (``Quantizer._plan``) is settled from the full one and cleared by every
    setting it depends on: bits, sign, grid, enabled, role, the gradient-scale switch, a
    state-dict load, calibration; an input's per-sample shape and a 1-D input's length."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    q = Quantizer(4, signed=True, role="input")
    q.initialize(x)
    assert q._plan is None
    base = _slow(q, x, g)
    assert q._plan == (False, torch.Size([3, 5]), True, -8, 7, 1.0 / math.sqrt(15 * 7))
    _slow(q, x[:2], g[:2])  # another batch size: the same plan
    assert q._plan[1] == torch.Size([3, 5])
    wide = torch.randn(4, 3, 6, generator=gen)  # another per-sample shape: another scale
    _slow(q, wide, torch.ones(wide.shape))
    assert q._plan[1] == torch.Size([3, 6]) and q._plan[5] == 1.0 / math.sqrt(18 * 7)

    q.set_bits(3)
    assert q._plan is None
    three = _slow(q, x, g)
    assert q._plan[3:5] == (-4, 3) and not torch.equal(three[0], base[0])
    for name, value in (("grid", "restricted"), ("signed", False), ("use_grad_scale", False)):
        setattr(q, name, value)
        assert q._plan is None, name
        _slow(q, x, g)
    assert q._plan[3:5] == (0, 7) and q._plan[5] == 1.0  # unsigned, no gradient scale
    q.role = "weight"  # the whole shape counts now
    assert q._plan is None
    _slow(q, x, g)
    assert q._plan[:2] == (True, x.shape)

    q.enabled = False
    assert q._plan is None and q(x) is x and q._plan is None
    q.enabled = True
    q.start_observing()
    assert q._plan is None and q(x) is x
    q.finish_observing()
    _slow(q, x, g)

    fresh = Quantizer(4, signed=True, role="input")
    fresh.load_state_dict(q.state_dict())  # bits 3, unsigned, restricted, ready
    assert fresh._plan is None and fresh._ready is None
    assert torch.equal(_slow(fresh, x, g)[0], _slow(q, x, g)[0])
    twin = copy.deepcopy(q)
    twin.set_bits(8)
    assert q._plan is not None and twin._plan is None

    vector = Quantizer(4, role="input")  # a 1-D input: the gradient scale counts its length
    vector.initialize(x.reshape(-1))
    _slow(vector, x.reshape(-1), g.reshape(-1))
    assert vector._plan[:2] == (True, torch.Size([60]))
    _slow(vector, x.reshape(-1)[:30], g.reshape(-1)[:30])
    assert vector._plan[1] == torch.Size([30]) and vector._plan[5] == 1.0 / math.sqrt(30 * 7)


def test_forward_plan_is_not_settled_while_compiling_or_for_other_policies(monkeypatch):
    x = torch.randn(2, 8)
    for scale in ("maxabs", "maxabs_ste", "lsq+"):
        q = Quantizer(4, scale=scale, role="input")
        q.initialize(x)
        q(x)
        assert q._plan is None, scale
    q = Quantizer(4, scale="minmax", role="input")  # a calibrated buffer step: planned
    q.initialize(x)
    want = q(x)
    assert q._plan[2] is False and torch.equal(q(x), want)
    q = Quantizer(4, role="input")
    q.initialize(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q(x)
    assert q._plan is None


def test_a_settled_plan_is_used_for_the_same_shape_only(monkeypatch):
    """The fast path really runs (else the speed work of issue 22 silently goes): once
    settled, ``_forward`` is called again only for a shape the plan was not made for: an
    input's per-sample shape (any batch size, 2-D and 3-D inputs), a weight's whole shape."""
    full_calls = []
    full = Quantizer._forward
    monkeypatch.setattr(
        Quantizer, "_forward", lambda self, x: full_calls.append(tuple(x.shape)) or full(self, x)
    )
    for role, first, same, other in (
        ("input", (4, 3, 5), (2, 3, 5), (4, 3, 6)),
        ("input", (4, 6), (7, 6), (4, 5)),
        ("weight", (4, 3, 5), (4, 3, 5), (2, 3, 5)),
        ("input", (9,), (9,), (8,)),
    ):
        q = Quantizer(4, role=role)
        q.initialize(torch.randn(first))
        full_calls.clear()
        q(torch.randn(first))
        q(torch.randn(same))
        assert full_calls == [first], (role, first)
        q(torch.randn(other))
        assert full_calls == [first, other], (role, other)
