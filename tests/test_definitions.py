"""Definitions pinned on hand-made input with an answer worked out by hand.

Each test feeds a formula numbers small enough to compute on paper (the expected values are
written out, never recomputed with the code under test), so a plausible one-line change to a
formula (a sign, a bound, ``>`` for ``>=``, every move counted as an oscillation) fails here.
They are the tests ``make mutants`` runs (docs/results/mutation.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qatlab
from qatlab.methods.oscillation import (
    IterativeFreezing,
    OscillationDampening,
    OscillationTracker,
    aggregate,
    bin_distance,
    cosine_decay,
    cosine_ramp,
)
from qatlab.quant.quantizer import (
    Quantizer,
    _FakeQuant,
    _FakeQuantTraceable,
    fake_quantize,
    grid_range,
    static_step,
)
from qatlab.quant.transitions import TransitionCounter
from qatlab.train.optim import LogAdam

_ALL_SAME = dict(first_layer="same", last_layer="same", weights_only=True)


def _layer(weights: list[float], step: float = 1.0, bits: int = 4):
    """A 4-bit quantized ``Linear(k, 1)`` with the given latent weights and a fixed step."""
    layer = qatlab.quantize(
        nn.Linear(len(weights), 1, bias=False), qatlab.QuantConfig(weight_bits=bits, **_ALL_SAME)
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.weight_quantizer.step.fill_(step)
    return layer


def _set(layer, weights: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))


# ----------------------------------------------------------------------------- grid, integers
def test_grid_ranges():
    assert grid_range(4, True) == (-8, 7)
    assert grid_range(4, True, "restricted") == (-7, 7)
    assert grid_range(4, False) == (0, 15)
    assert grid_range(2, True) == (-2, 1)
    assert grid_range(8, False) == (0, 255)
    assert grid_range(3, True, "restricted") == (-3, 3)


def test_integer_view_rounds_half_to_even_and_clips():
    layer = _layer([0.0] * 8, step=0.5)
    _set(layer, [-5.0, -4.3, -0.75, -0.25, 0.25, 1.25, 3.7, 3.8])
    # x/s = -10, -8.6, -1.5, -0.5, 0.5, 2.5, 7.4, 7.6 -> round half to even, clamp to [-8, 7]
    assert layer.weight_int().tolist() == [[-8, -8, -2, -0, 0, 2, 7, 7]]
    back = layer.weight_quantizer.quantize_detached(layer.weight)
    assert back.tolist() == [[-4.0, -4.0, -1.0, 0.0, 0.0, 1.0, 3.5, 3.5]]


def test_static_steps_by_hand():
    x = torch.tensor([1.0, -2.0, 3.0, -6.0])
    # meanabs (LSQ): 2 * mean|x| / sqrt(p) = 2 * 3 / sqrt(7)
    assert float(static_step(x, "meanabs", -8, 7)) == pytest.approx(6 / math.sqrt(7))
    assert float(static_step(x, "minmax", -8, 7)) == pytest.approx(6 / 7)
    rows = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    assert static_step(rows, "minmax", -8, 7, per_channel=True).tolist() == pytest.approx(
        [2 / 7, 0.5 / 7]
    )
    # mse on values already on a grid of step 1 with max 7: the exact grid is the best (err 0)
    on_grid = torch.tensor([7.0, -3.0, 2.0, 1.0, 0.0, 5.0])
    assert float(static_step(on_grid, "mse", -8, 7)) == pytest.approx(1.0)


def test_set_bits_keeps_the_clipping_range():
    q = Quantizer(4, role="weight")
    q.initialize(torch.tensor([7.0, -7.0]))  # mse -> step 1 (p = 7)
    assert float(q.step) == pytest.approx(1.0)
    q.set_bits(3)  # p 7 -> 3: step * 7 / 3
    assert float(q.step) == pytest.approx(7 / 3)
    assert q.grid_range == (-4, 3)


# ----------------------------------------------------------------------------- LSQ fake quant
# x / s with s = 0.5, grid [-8, 7]: clipped below, tie, tie, inside, tie, inside, clipped above
_X = [-5.0, -0.75, -0.25, 0.3, 1.25, 3.7, 3.8, 10.0]
_Q = [-4.0, -1.0, 0.0, 0.5, 1.0, 3.5, 3.5, 3.5]  # s * clamp(round(x/s), -8, 7)
_INSIDE = [0, 1, 1, 1, 1, 1, 0, 0]  # -8.5 < x/s < 7.5
# ds per element: q_int - x/s inside, q_int (n or p) where clipped
_DS = [-8, -2 + 1.5, 0 + 0.5, 1 - 0.6, 2 - 2.5, 7 - 7.4, 7, 7]


@pytest.mark.parametrize("fn", [_FakeQuant, _FakeQuantTraceable])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_forward_and_gradients_by_hand(fn, per_channel):
    x = torch.tensor(_X, requires_grad=True)
    step = torch.tensor([0.5] if per_channel else 0.5, requires_grad=True)
    g = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, -2.0, 1.0, 4.0])
    out = fn.apply(x, step, -8, 7, 0.25)
    assert out.tolist() == pytest.approx(_Q)
    out.backward(g)
    inside = [gi * m for gi, m in zip(g.tolist(), _INSIDE, strict=True)]
    assert x.grad.tolist() == pytest.approx(inside)
    expected = 0.25 * sum(gi * d for gi, d in zip(g.tolist(), _DS, strict=True))
    assert step.grad.reshape(-1).tolist() == pytest.approx([expected], rel=1e-5)


def test_lsq_per_channel_rows_get_their_own_step_gradient():
    x = torch.tensor([[0.3, 10.0], [-0.3, 0.1]], requires_grad=True)
    step = torch.tensor([1.0, 0.25], requires_grad=True)
    out = fake_quantize(x, step, -8, 7, 1.0)
    assert out.reshape(-1).tolist() == pytest.approx([0.0, 7.0, -0.25, 0.0])
    out.sum().backward()
    # row 0: (0 - 0.3) + 7 (clipped); row 1: x/s = -1.2, 0.4 -> (-1 + 1.2) + (0 - 0.4)
    assert step.grad.tolist() == pytest.approx([6.7, -0.2])
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_quantizer_applies_lsq_gradient_scale():
    # weight role: 1/sqrt(N p) with N = 8 weights per step, p = 7
    q = Quantizer(4, role="weight")
    q.initialize(torch.tensor([7.0, -7.0]))
    w = torch.tensor([0.3, 1.6, -2.2, 0.0, 3.4, -0.6, 0.9, 20.0])
    q(w).sum().backward()
    raw = (0 - 0.3) + (2 - 1.6) + (-2 + 2.2) + 0 + (3 - 3.4) + (-1 + 0.6) + (1 - 0.9) + 7
    assert float(q.step.grad) == pytest.approx(raw / math.sqrt(8 * 7), rel=1e-5)
    # input role: N = features per sample (4 here, batch of 2), p = 15 for an unsigned input
    a = Quantizer(4, signed=False)
    a.initialize(torch.tensor([15.0, 0.0]))  # mse -> step 1
    assert float(a.step) == pytest.approx(1.0)
    x = torch.tensor([[0.2, 1.7, 16.0, 3.0], [0.0, 0.5, 2.4, 9.9]])
    a(x).sum().backward()
    raw = (0 - 0.2) + (2 - 1.7) + 15 + 0 + 0 + (0 - 0.5) + (2 - 2.4) + (10 - 9.9)
    assert float(a.step.grad) == pytest.approx(raw / math.sqrt(4 * 15), rel=1e-5)
    # grad_scale=False: the raw sum
    b = Quantizer(4, role="weight", grad_scale=False)
    b.initialize(torch.tensor([7.0, -7.0]))
    b(torch.tensor([0.3, 20.0])).sum().backward()
    assert float(b.step.grad) == pytest.approx(-0.3 + 7)


# ----------------------------------------------------------------------------- transitions
def test_transition_counts_on_two_known_tensors():
    before = [0.0, 1.0, 2.0, -3.0, 7.0, -8.0, 5.2, 0.4]
    after = [1.0, 1.0, 0.0, -4.0, 9.0, -8.0, 4.6, -0.4]  # ints 1 1 0 -4 7 -8 5 0
    layer = _layer(before)
    counter = TransitionCounter(layer, include_pinned=True)
    _set(layer, after)
    moves = counter.update(layer, step=0)
    (name,) = counter.layer_names
    assert moves.direction[name].tolist() == [[1, 0, -1, -1, 0, 0, 0, 0]]
    assert moves.current[name].tolist() == [[1, 1, 0, -4, 7, -8, 5, 0]]
    assert moves.counts() == {name: (3, 1, 2, 8)}
    assert moves.rate() == pytest.approx(3 / 8)
    assert moves.metrics(per_layer=True) == pytest.approx(
        {"tr": 3 / 8, "tr_up": 1 / 8, "tr_down": 2 / 8, f"tr/{name}": 3 / 8}
    )
    assert moves.layer_rates() == pytest.approx({name: 3 / 8})
    # the same step again: the cached result; the next step compares with `after`
    assert counter.update(layer, step=0) is moves
    _set(layer, [1.0, 3.0, 0.0, -4.0, 7.0, -8.0, 5.0, 0.0])
    nxt = counter.update(layer, step=1)
    assert nxt.direction[name].tolist() == [[0, 1, 0, 0, 0, 0, 0, 0]]
    assert nxt.rate() == pytest.approx(1 / 8)


# ----------------------------------------------------------------------------- oscillations
# two weights, integer sequences (the first entry is the integer at construction)
_SEQ_A = [0, 1, 2, 1, 2, 2, 3, 2]  # moves + + - + 0 + -: oscillations at moves 3, 4, 7
_SEQ_B = [0, -1, -2, -3, -3, -4, -5, -6]  # always down: never an oscillation
_OSC_A = [0, 0, 1, 1, 0, 0, 1]  # o_t per update (the first move can never be one)


def test_oscillation_counts_only_reversals():
    layer = _layer([float(_SEQ_A[0]), float(_SEQ_B[0])])
    m = 0.25
    tracker = OscillationTracker(layer, momentum=m, threshold=0.3)
    (name,) = tracker.layer_names
    f = 0.0
    ema_a = float(_SEQ_A[0])
    for t in range(1, len(_SEQ_A)):
        _set(layer, [float(_SEQ_A[t]), float(_SEQ_B[t])])
        tracker.after_step(layer, t - 1, 100)
        f = (1 - m) * f + m * _OSC_A[t - 1]
        ema_a = (1 - m) * ema_a + m * _SEQ_A[t]
        assert tracker.frequency(name)[0].tolist() == pytest.approx([f, 0.0])
    assert tracker.flips(name).tolist() == [[3, 0]]
    assert tracker.buffer(name, "ema_int")[0, 0].item() == pytest.approx(ema_a)
    # f_A = 0.25*(0.75^4 + 0.75^3) + 0.25 = 0.4033...; share above 0.3: 1 of 2 weights
    assert f == pytest.approx(0.25 * (0.75**4 + 0.75**3) + 0.25)
    assert tracker.oscillating_share() == pytest.approx(0.5)
    assert tracker.oscillating_share(threshold=0.5) == 0.0
    stats = tracker.stats(bins=4)[name]
    assert stats["share"] == pytest.approx(0.5)
    assert stats["mean_freq"] == pytest.approx(f / 2)


def test_a_pause_does_not_reset_the_last_direction():
    # up, pause, pause, down: the down move reverses the last *non-zero* move
    layer = _layer([0.0])
    tracker = OscillationTracker(layer, momentum=0.5)
    for t, v in enumerate([1.0, 1.0, 1.0, 0.0]):
        _set(layer, [v])
        tracker.update(layer, t)
    (name,) = tracker.layer_names
    assert tracker.flips(name).tolist() == [[1]]
    assert float(tracker.frequency(name)) == pytest.approx(0.5)


def test_freezing_at_a_known_step_and_integer():
    # weight 0 flips 2,3,2,3,... (integer at construction 2); weight 1 climbs and never flips.
    # momentum 0.25: f = 0, .25, .4375, .578125, .68359375 after updates 0..4;
    # ema_int = 2.25, 2.1875, 2.390625, 2.29296875, 2.4697265625 -> freezes at update 4
    # (f > 0.578125 first there; `>=` would freeze at update 3) at round(2.4697) = 2, while the
    # weight's current integer is 3.
    layer = _layer([2.0, -5.0])
    total = 1000
    fr = IterativeFreezing(
        layer,
        momentum=0.25,
        threshold_start=0.578125,
        threshold_end=0.578125,
        start=0.0,
        max_bits=4,
    )
    (name,) = fr.layer_names
    seq0 = [3.0, 2.0, 3.0, 2.0, 3.0]
    for t, v in enumerate(seq0):
        _set(layer, [v, -4.0 + t])
        fr.after_step(layer, t, total)
        frozen = fr.frozen(name)[0].tolist()
        assert frozen == [t >= 4, False], t
    assert fr.buffer(name, "frozen_int")[0, 0].item() == 2
    assert layer.weight_int().tolist() == [[2, 0]]  # written back at s * 2
    assert layer.weight[0, 0].item() == 2.0
    assert fr.frozen_share() == pytest.approx(0.5)
    # the optimizer moves it again: written back before the next update, gradient masked
    _set(layer, [6.0, 1.0])
    fr.after_step(layer, 5, total)
    assert layer.weight.tolist() == [[2.0, 1.0]]
    layer.weight.grad = None
    layer(torch.ones(1, 2)).sum().backward()
    assert layer.weight.grad.tolist() == [[0.0, 1.0]]


def test_freezing_threshold_closed_before_start():
    # start 0.5 of 10 steps: nothing freezes at steps 0..5 whatever f is
    layer = _layer([0.0])
    fr = IterativeFreezing(layer, momentum=1.0, threshold_start=0.0, threshold_end=0.0, start=0.5)
    (name,) = fr.layer_names
    for t in range(8):
        _set(layer, [float(t % 2 == 0)])
        fr.after_step(layer, t, 10)
        assert bool(fr.frozen(name)[0, 0]) == (t >= 6), t


def test_schedules_by_hand():
    assert cosine_ramp(0.25, 0.25, 2.0) == 0.0
    assert cosine_ramp(0.625, 0.25, 2.0) == pytest.approx(1.0)  # half way: peak/2
    assert cosine_ramp(1.0, 0.25, 2.0) == pytest.approx(2.0)
    assert cosine_ramp(1.5, 0.25, 2.0) == pytest.approx(2.0)
    assert cosine_ramp(0.4375, 0.25, 1.0) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert cosine_decay(0.25, 0.1, 0.01, 0.25) == math.inf
    assert cosine_decay(0.625, 0.1, 0.01, 0.25) == pytest.approx(0.055)
    assert cosine_decay(1.0, 0.1, 0.01, 0.25) == pytest.approx(0.01)
    assert cosine_decay(2.0, 0.1, 0.01, 0.25) == pytest.approx(0.01)
    assert cosine_decay(0.4375, 0.1, 0.01, 0.25) == pytest.approx(
        0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 4))
    )


# ----------------------------------------------------------------------------- dampening
# step 1, 4 bit: q = [[0, -1, 7], [1, 0, 0]]; clamp(w) = w except 9 -> 7
# d = q - clamp(w) = [[-0.3, 0.2, 0], [0.4, -0.5, 0.2]] (0.5 rounds to 0: half to even)
_W = [[0.3, -1.2, 9.0], [0.6, 0.5, -0.2]]
_D = [[-0.3, 0.2, 0.0], [0.4, -0.5, 0.2]]
_SQ = 0.09 + 0.04 + 0.16 + 0.25 + 0.04  # 0.58


@pytest.mark.parametrize(
    "how, value, per_elem",
    [("kernel_mean", _SQ / 3, 1 / 3), ("mean", _SQ / 6, 1 / 6), ("sum", _SQ, 1.0)],
)
def test_dampening_loss_and_gradient_by_hand(how, value, per_elem):
    layer = qatlab.quantize(nn.Linear(3, 2, bias=False), qatlab.QuantConfig(**_ALL_SAME))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(_W))
        layer.weight_quantizer.step.fill_(1.0)
    expected_grad = [[-2 * d * per_elem for d in row] for row in _D]
    # the reference (autograd) form and the fused one used by OscillationDampening
    ref = bin_distance(layer.weight, layer.weight_quantizer, how)
    assert float(ref) == pytest.approx(value)
    (g,) = torch.autograd.grad(ref, layer.weight)
    assert g.tolist() == [pytest.approx(r) for r in expected_grad]
    damp = OscillationDampening(lambda_max=2.0, aggregation=how, start=0.25)
    assert damp.loss_term(layer, 25, 100) is None  # ramp off up to `start`
    term = damp.loss_term(layer, 625, 1000)  # half way up the ramp: lambda = 1
    assert float(term) == pytest.approx(value)
    (g,) = torch.autograd.grad(term, layer.weight)
    assert g.tolist() == [pytest.approx(r) for r in expected_grad]
    assert layer.weight_quantizer.step.grad is None


def test_aggregate_kernel_mean():
    v = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 0.0, 0.0]])
    assert float(aggregate(v, "kernel_mean")) == pytest.approx(3.0 + 2.0)
    assert float(aggregate(v, "mean")) == pytest.approx(20 / 8)
    assert float(aggregate(v, "sum")) == pytest.approx(20.0)


# ----------------------------------------------------------------------------- LogAdam
def test_logadam_two_steps_by_hand():
    p = nn.Parameter(torch.tensor(0.5))
    opt = LogAdam([p], lr=0.1, betas=(0.5, 0.75), eps=1e-8)
    p.grad = torch.tensor(2.0)  # d/dlog p = 0.5 * 2 = 1
    opt.step()
    # m = 0.5, v = 0.25; m_hat = 1, v_hat = 1 -> p * exp(-0.1 * 1 / (1 + eps))
    p1 = 0.5 * math.exp(-0.1 / (1 + 1e-8))
    assert float(p) == pytest.approx(p1, rel=1e-6)
    p.grad = torch.tensor(-3.0)
    g2 = p1 * -3.0
    opt.step()
    m = 0.5 * 0.5 + 0.5 * g2
    v = 0.75 * 0.25 + 0.25 * g2**2
    m_hat, v_hat = m / (1 - 0.25), v / (1 - 0.5625)
    p2 = p1 * math.exp(-0.1 * m_hat / (math.sqrt(v_hat) + 1e-8))
    assert float(p) == pytest.approx(p2, rel=1e-6)


def test_logadam_plain_adam_group():
    p = nn.Parameter(torch.tensor([-0.5, 2.0]))
    opt = LogAdam([{"params": [p], "log": False}], lr=0.1, betas=(0.5, 0.75), eps=1e-3)
    p.grad = torch.tensor([2.0, -4.0])
    opt.step()
    # m_hat = g, v_hat = g^2: update = 0.1 * g / (|g| + 1e-3)
    assert p.tolist() == pytest.approx([-0.5 - 0.1 * 2 / 2.001, 2.0 + 0.1 * 4 / 4.001], rel=1e-6)


# ----------------------------------------------------------------------------- SAQ
# Linear(2, 1) without bias, step 1 (held fixed), w = [0.3, 1.2] -> q(w) = [0, 1];
# x = [1, 2], y = 3, L = (q(w).x - y)^2: first pass out = 2, dL/dq = 2 (2 - 3) x = [-2, -4]
_G = [-2.0, -4.0]


def _saq_step(rho: float, case: int, lr: float = 0.1, **kw) -> tuple[list[float], float]:
    from qatlab.methods.saq import SAQ

    layer = _layer([0.3, 1.2])
    layer.weight_quantizer.step.requires_grad_(False)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    kw.setdefault("ball", "raw")  # the hand computations below are on raw weights
    opt = SAQ(torch.optim.SGD([layer.weight], lr=lr), layer, rho=rho, case=case, **kw)

    def closure():
        opt.zero_grad()
        loss = (layer(x) - y).pow(2).sum()
        loss.backward()
        return loss

    loss = float(opt.step(closure))
    return layer.weight[0].tolist(), loss


def _descent(e: list[float], lr: float = 0.1) -> list[float]:
    """SGD step from w = [0.3, 1.2] with the gradient taken at q(w) + e (inside the range)."""
    out = 2.0 + e[0] * 1.0 + e[1] * 2.0
    return [0.3 - lr * 2 * (out - 3) * 1.0, 1.2 - lr * 2 * (out - 3) * 2.0]


@pytest.mark.parametrize("case", [1, 3])
def test_saq_one_step_by_hand(case):
    # e = rho g / ||g|| added to q(w) in the second pass (cases 1 and 3 agree: w is in range)
    norm = math.sqrt(20.0)
    e = [0.5 * g / norm for g in _G]
    w, loss = _saq_step(0.5, case)
    assert loss == pytest.approx(1.0)  # the first pass's loss
    assert w == pytest.approx(_descent(e), rel=1e-5)


def test_saq_case2_perturbs_the_latent_weight():
    # w + e = [0.3 - 0.224, 1.2 - 0.447] still rounds to [0, 1]: second-pass gradient = first's
    w, _ = _saq_step(0.5, 2)
    assert w == pytest.approx(_descent([0.0, 0.0]), rel=1e-5)
    # a ball large enough to move q(w): e = 2 g/||g|| = [-0.894, -1.789]: w + e = [-0.59, -0.59]
    # -> q = [-1, -1]; out = -3, gradient 2 (-3 - 3) x = [-12, -24]
    w, _ = _saq_step(2.0, 2)
    assert w == pytest.approx([0.3 + 0.1 * 12, 1.2 + 0.1 * 24], rel=1e-5)


def test_saq_rho_zero_is_plain_qat():
    w, loss = _saq_step(0.0, 3)
    assert loss == pytest.approx(1.0)
    assert w == pytest.approx(_descent([0.0, 0.0]), rel=1e-6)


def test_saq_adaptive_ball_by_hand():
    # case 3: T = |q(w)| + eta = [0.01, 1.01]; e = rho T^2 g / ||T g||
    t = [0.01, 1.01]
    norm = math.sqrt(sum((ti * g) ** 2 for ti, g in zip(t, _G, strict=True)))
    e = [0.5 * ti * ti * g / norm for ti, g in zip(t, _G, strict=True)]
    w, _ = _saq_step(0.5, 3, adaptive=True, eta=0.01)
    assert w == pytest.approx(_descent(e), rel=1e-5)


def test_saq_std_ball_by_hand():
    # ball="std": u = unbiased std of the latent weight = 0.9 / sqrt(2);
    # e = rho u^2 g / ||u g|| = rho u g / ||g|| (one tensor)
    u = 0.9 / math.sqrt(2.0)
    e = [0.5 * u * g / math.sqrt(20.0) for g in _G]
    w, _ = _saq_step(0.5, 3, ball="std")
    assert w == pytest.approx(_descent(e), rel=1e-5)


# ----------------------------------------------------------------------------- edges (mutants)
@pytest.mark.parametrize("fn", [_FakeQuant, _FakeQuantTraceable])
def test_lsq_range_edges_and_gradient_flags(fn):
    # x/s = -9.2 (out), -8.5 (tie: out, both forms), -8.4 (in), 7.4 (in), 7.5 (tie: out)
    x = torch.tensor([-9.2, -8.5, -8.4, 7.4, 7.5], requires_grad=True)
    out = fn.apply(x, torch.tensor(1.0), -8, 7, 1.0)  # step without gradient
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    # only the step needs a gradient
    step = torch.tensor(1.0, requires_grad=True)
    fn.apply(torch.tensor([-8.4, 7.5]), step, -8, 7, 1.0).sum().backward()
    assert float(step.grad) == pytest.approx((-8 + 8.4) + 7)


def test_set_bits_rescales_only_an_initialized_learned_step_when_asked():
    fresh = Quantizer(4, role="weight")  # not initialized: its step is a placeholder
    fresh.set_bits(3)
    assert float(fresh.step) == 1.0
    q = Quantizer(4, role="weight")
    q.initialize(torch.tensor([7.0, -7.0]))
    q.set_bits(3, rescale=False)
    assert float(q.step) == pytest.approx(1.0)


def test_transition_rates_of_a_single_weight():
    layer = _layer([0.0])
    counter = TransitionCounter(layer, include_pinned=True)
    _set(layer, [1.0])
    moves = counter.update(layer)
    (name,) = counter.layer_names
    assert moves.rate() == 1.0
    assert moves.layer_rates() == {name: 1.0}
    assert moves.metrics() == {"tr": 1.0, "tr_up": 1.0, "tr_down": 0.0}  # no per-layer keys
    assert moves.metrics(per_layer=True)[f"tr/{name}"] == 1.0


def test_tracker_logs_its_share_every_log_every_steps():
    layer = _layer([0.0])
    tracker = OscillationTracker(layer, momentum=0.5, threshold=0.1, log_every=3)
    logs = []
    for t, v in enumerate([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]):
        _set(layer, [v])
        logs.append(tracker.after_step(layer, t, 6))
    # f after steps 0..5: 0, 0.5, 0.75, 0.375, 0.1875, 0.09375 (threshold 0.1): logged after
    # the 3rd and 6th steps only
    assert logs == [None, None, {"osc_share": 1.0}, None, None, {"osc_share": 0.0}]
    assert OscillationTracker(layer, log_every=0).after_step(layer, 0, 6) is None


def test_tracker_after_step_uses_a_shared_counters_cached_step():
    # two hooks sharing one counter see the same step's moves (the step keys the cache)
    layer = _layer([0.0])
    tracker = OscillationTracker(layer, momentum=0.5)
    _set(layer, [1.0])
    tracker.transitions.update(layer, 0)  # another user of the counter went first
    tracker.after_step(layer, 0, 10)
    assert tracker.buffer(tracker.layer_names[0], "dir").tolist() == [[1]]


def test_freezing_defaults_are_nagels():
    layer = _layer([0.0])
    fr = IterativeFreezing(layer)
    assert (fr.momentum, fr.threshold_start, fr.threshold_end, fr.start) == (0.001, 0.1, 0.01, 0.25)
    assert fr.threshold == 0.01 and fr.log_every == 50
    assert cosine_decay(0.3, 0.1, 0.01) < math.inf  # default start 0.25
    assert cosine_ramp(0.3) > 0.0
    assert fr.threshold_at(1, 1) == pytest.approx(0.01)  # progress = step / total
    five = _layer([0.0], bits=5)
    assert IterativeFreezing(five).layer_names == []  # max_bits 4: a 5-bit layer is not frozen
    assert IterativeFreezing(five, max_bits=5).layer_names != []
    assert IterativeFreezing(layer, threshold_end=0.02).threshold == 0.02
    logged = None
    for t in range(50):
        logged = fr.after_step(layer, t, 100)
    assert logged == {"osc_share": 0.0, "frozen_share": 0.0}


def _ready(q: Quantizer, step: float, offset: float | None = None) -> Quantizer:
    with torch.no_grad():
        q.step.fill_(step)
        if offset is not None:
            q.offset.fill_(offset)
    q.initialized.fill_(True)
    q._ready = True
    return q


def test_lsq_plus_forward_and_gradients_by_hand():
    # unsigned 4 bit (0..15), s = 0.5, offset -1: x - o = 1.1, 0.7, 9.0 -> /s 2.2, 1.4, 18 ->
    # ints 2, 1, 15 -> q = 0.5 * int - 1 = 0, -0.5, 6.5
    q = _ready(Quantizer(4, scale="lsq+", grad_scale=False, role="weight"), 0.5, -1.0)
    x = torch.tensor([0.1, -0.3, 8.0], requires_grad=True)
    out = q(x)
    assert out.tolist() == pytest.approx([0.0, -0.5, 6.5])
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    assert float(q.step.grad) == pytest.approx((2 - 2.2) + (1 - 1.4) + 15)
    # d/do (q(x - o) + o): 0 inside, 1 where clipped
    assert float(q.offset.grad.detach()) == pytest.approx(1.0)


def test_maxabs_ste_step_carries_a_gradient():
    # step = max|x| / p = 7 / 7 = 1; x = [7, 0.4, -2.6]: q = [7, 0, -3]
    # dq/dx = 1 inside; through the step: dq/ds = round(x/s) - x/s = [0, -0.4, -0.4], and
    # ds/dx = sign(x)/p at the largest |x| (index 0): d sum(q) / dx0 = 1 + (-0.8) / 7
    q = Quantizer(4, scale="maxabs_ste", role="weight")
    x = torch.tensor([7.0, 0.4, -2.6], requires_grad=True)
    out = q(x)
    assert out.tolist() == pytest.approx([7.0, 0.0, -3.0])
    out.sum().backward()
    assert x.grad.tolist() == pytest.approx([1.0 - 0.8 / 7, 1.0, 1.0])
    plain = Quantizer(4, scale="maxabs", role="weight")
    x2 = torch.tensor([7.0, 0.4, -2.6], requires_grad=True)
    plain(x2).sum().backward()
    assert x2.grad.tolist() == pytest.approx([1.0, 1.0, 1.0])  # step held constant


def test_quantizer_initialises_from_its_first_training_batch_only():
    act = Quantizer(4, signed=False, init="minmax")
    with pytest.raises(qatlab.ConfigError):
        act.eval()(torch.ones(2, 3))  # an activation step must never come from eval data
    assert not bool(act.initialized)
    act.train()(torch.tensor([[0.0, 15.0, 3.0]]))  # minmax: 15 / 15 = 1
    assert float(act.step.detach()) == pytest.approx(1.0)
    weight = Quantizer(4, init="minmax", role="weight").eval()  # weights may, in eval too
    weight(torch.tensor([7.0, -14.0]))
    assert float(weight.step) == pytest.approx(2.0)
    # a fresh quantizer loading a state dict uses the loaded step (no re-initialisation)
    fresh = Quantizer(4, init="minmax", role="weight")
    fresh.load_state_dict(weight.state_dict())
    assert fresh(torch.tensor([7.0, 3.0])).tolist() == pytest.approx([8.0, 4.0])  # s 2: 3.5, 1.5
    # calibration: observe (identity), then initialise from everything observed
    cal = Quantizer(4, signed=False, init="minmax")
    cal.start_observing()
    assert cal(torch.tensor([[1.0, 30.0]])).tolist() == [[1.0, 30.0]]
    cal.finish_observing()
    assert float(cal.step) == pytest.approx(2.0)


def test_grad_scale_counts_per_role():
    w = torch.tensor([[0.3, 1.6, -2.2, 0.0], [3.4, -0.6, 0.9, 20.0]])
    raw = (0 - 0.3) + (2 - 1.6) + (-2 + 2.2) + 0 + (3 - 3.4) + (-1 + 0.6) + (1 - 0.9) + 7
    for role, count in (("weight", 8), ("input", 4)):  # weights per step / features per sample
        q = _ready(Quantizer(4, role=role), 1.0)
        q(w).sum().backward()
        assert float(q.step.grad) == pytest.approx(raw / math.sqrt(count * 7), rel=1e-5), role
    q = _ready(Quantizer(4), 1.0)  # a 1-D input: every element is a feature
    q(w[0]).sum().backward()
    assert float(q.step.grad) == pytest.approx(0.3 / math.sqrt(4 * 7), rel=1e-4)


def test_dampening_edge_shapes_and_quantizers():
    # below the grid: w = -9.3 at s = 0.5 is clipped (d = 0); 1-row and 1-element kernels
    damp = OscillationDampening(aggregation="kernel_mean")
    layer = _layer([-9.3, 0.3, 1.2], step=0.5)  # /s: -18.6 (clipped), 0.6 -> 1, 2.4 -> 2
    assert float(damp.penalty(layer)) == pytest.approx((0.2**2 + 0.2**2) / 3)
    col = qatlab.quantize(nn.Linear(1, 2, bias=False), qatlab.QuantConfig(**_ALL_SAME))
    with torch.no_grad():
        col.weight.copy_(torch.tensor([[0.3], [0.8]]))
        col.weight_quantizer.step.fill_(1.0)
    assert float(damp.penalty(col)) == pytest.approx(0.09 + 0.04)  # two kernels of 1 weight
    one = _layer([0.3])
    assert float(OscillationDampening(aggregation="mean").penalty(one)) == pytest.approx(0.09)
    # lsq+ (offset -1, s 1: w - o = 1.3, 2.4 -> 1, 2 -> q = 0, 1) and per-channel steps
    lsqp = _layer([0.3, 1.4])
    lsqp.weight_quantizer = _ready(Quantizer(4, scale="lsq+", role="weight"), 1.0, -1.0)
    assert float(damp.penalty(lsqp)) == pytest.approx((0.09 + 0.16) / 2)
    pc = qatlab.quantize(nn.Linear(2, 2, bias=False), qatlab.QuantConfig(**_ALL_SAME))
    pc.weight_quantizer = _ready(Quantizer(4, channels=2, role="weight"), 1.0)
    with torch.no_grad():
        pc.weight_quantizer.step.copy_(torch.tensor([1.0, 0.5]))
        pc.weight.copy_(torch.tensor([[0.3, 1.2], [0.3, 1.2]]))  # /s row 1: 0.6, 2.4 -> 1, 2
    assert float(damp.penalty(pc)) == pytest.approx((0.09 + 0.04) / 2 + (0.04 + 0.04) / 2)


def _mse_reference(row: torch.Tensor, n: int, p: int) -> float:
    """Nagel's search written out: T_k = k/100 max|x|, s = T_k / p, the first k of least error."""
    best, best_s = math.inf, None
    for k in range(1, 101):
        s = k / 100 * float(row.abs().max()) / p
        err = float(((row / s).round().clamp(n, p) * s - row).pow(2).sum())
        if err < best:
            best, best_s = err, s
    return best_s


def test_mse_step_matches_the_search_written_out():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 400, generator=gen)
    rows[0, 0], rows[2, 5] = 12.0, -9.0  # outliers: the best steps clip
    for n, p in ((-8, 7), (0, 15), (-2, 1)):
        got = static_step(rows, "mse", n, p, per_channel=True)
        ref = [_mse_reference(r, n, p) for r in rows]
        assert got.tolist() == pytest.approx(ref, rel=1e-5), (n, p)
        assert float(static_step(rows[0], "mse", n, p)) == pytest.approx(ref[0], rel=1e-5)
        assert float(static_step(rows, "mse", n, p)) == pytest.approx(
            _mse_reference(rows.reshape(-1), n, p), rel=1e-5
        )
    # candidates in chunks (numel > 2^24 / 100): same answer as the search
    big = torch.randn(200_000, generator=gen)
    big[7] = 15.0
    assert float(static_step(big, "mse", -8, 7)) == pytest.approx(
        _mse_reference(big, -8, 7), rel=1e-5
    )


def test_mse_step_searches_no_step_beyond_max_abs():
    # x = 7 and 1.01 k (k = 1..6, ten times each). A step 1.01 (T = 1.01 max|x|) would fit the
    # 60 values exactly (error only at 7: (7.07 - 7)^2 = 0.0049), but the search is over
    # (0, max|x|]: the best there is T = max|x|, s = 1, error 10 * 0.01^2 * (1 + 4 + ... + 36)
    # = 0.091 (s = 0.99 already costs 0.369)
    x = torch.tensor([7.0] + [1.01 * k for k in range(1, 7)] * 10)
    assert float(static_step(x, "mse", -8, 7)) == pytest.approx(1.0)
    assert _mse_reference(x, -8, 7) == pytest.approx(1.0)


def test_percentile_and_maxabs_steps():
    x = torch.arange(0.0, 101.0)  # |x| quantile q = q (linear interpolation)
    assert float(static_step(x, "percentile", 0, 15, percentile=50.0)) == pytest.approx(50 / 15)
    assert float(static_step(-x, "percentile", -8, 7)) == pytest.approx(99.99 / 7)
    assert float(static_step(x, "maxabs", -8, 7)) == pytest.approx(100 / 7)
    rows = torch.stack([x, 2 * x])
    got = static_step(rows, "percentile", -8, 7, per_channel=True, percentile=25.0)
    assert got.tolist() == pytest.approx([25 / 7, 50 / 7])


def test_fake_quantize_default_grad_scale_is_one():
    step = torch.tensor(1.0, requires_grad=True)
    fake_quantize(torch.tensor([0.3, 9.0]), step, -8, 7).sum().backward()
    assert float(step.grad) == pytest.approx(-0.3 + 7)


def test_per_channel_maxabs_steps():
    # rows' max|x| = 7 and 14 -> steps 1 and 2 (p = 7), with and without a gradient through it
    x = torch.tensor([[7.0, 0.4, -2.6], [-14.0, 3.0, 1.0]])
    for scale in ("maxabs", "maxabs_ste"):
        q = Quantizer(4, scale=scale, channels=2, role="weight")
        assert q.current_step(x).tolist() == [1.0, 2.0]
        assert q(x).reshape(-1).tolist() == pytest.approx([7.0, 0.0, -3.0, -14.0, 4.0, 0.0])
    one = Quantizer(4, scale="maxabs_ste", role="weight")
    assert float(one(torch.tensor([-14.0, 3.0]))[1]) == pytest.approx(4.0)  # s 2: 1.5 -> 2


def test_constructor_defaults():
    q = Quantizer()
    assert (q.bits, q.role, q.percentile, q.signed, q.grid) == (4, "input", 99.99, True, "full")
    assert (q.fixed_bits, q.per_channel) == (False, False)
    assert (bool(q.initialized), q._ready) == (False, False)
    assert isinstance(q.step, nn.Parameter) and q.step.shape == ()
    calibrated = Quantizer(scale="mse")
    assert not isinstance(calibrated.step, nn.Parameter)
    assert "step" in dict(calibrated.named_buffers())
    pc = Quantizer(channels=2)
    assert pc.per_channel and pc.step.shape == (2,)
    plus = Quantizer(scale="lsq+", signed=True)  # LSQ+ is on an unsigned grid with an offset
    assert plus.signed is False and isinstance(plus.offset, nn.Parameter)
    assert plus.grid_range == (0, 15)
    assert not hasattr(Quantizer(), "offset")
    auto = Quantizer(signed="auto", init="minmax")
    auto(torch.tensor([[-1.0, 2.0]]))
    assert auto.signed is True
    layer = _layer([0.0])
    tracker = OscillationTracker(layer)
    assert (tracker.momentum, tracker.threshold, tracker.log_every) == (0.001, 0.01, 50)
    assert tracker.flips(tracker.layer_names[0]).dtype == torch.int32  # 127 flips fit no int8
    damp = OscillationDampening()
    assert (damp.lambda_max, damp.aggregation, damp.start) == (0.1, "kernel_mean", 0.25)
    assert (damp.max_bits, damp.include_pinned) == (None, True)
    assert damp.weight(1, 1) == pytest.approx(0.1)  # progress = step / total
    assert float(damp.penalty(nn.Linear(2, 2))) == 0.0  # nothing quantized: no term


def test_dampening_layer_selection():
    # a model with first/last layers pinned to 8 bits: include_pinned and max_bits choose them
    model = qatlab.quantize(
        nn.Sequential(
            nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        ),
        qatlab.QuantConfig(weights_only=True),
    )
    with torch.no_grad():
        for m in model:
            m.weight.fill_(0.3)
            m.weight_quantizer.step.fill_(1.0)
    per_layer = (4 * 0.09) / 2  # kernel mean of 2 rows of 2 weights at distance 0.3
    assert float(OscillationDampening().penalty(model)) == pytest.approx(3 * per_layer)
    assert float(OscillationDampening(include_pinned=False).penalty(model)) == pytest.approx(
        per_layer
    )
    assert float(OscillationDampening(max_bits=4).penalty(model)) == pytest.approx(per_layer)
    # trackers count the free layers only (names with dots are valid buffer keys)
    tracker = OscillationTracker(model)
    assert tracker.layer_names == ["1"]
    root = OscillationTracker(_layer([0.0]))
    assert root.layer_names == [""] and hasattr(root, "root__freq")


def test_check_bits_and_logadam_defaults():
    from qatlab.quant.quantizer import check_bits

    assert check_bits(2) == 2 and check_bits(8) == 8
    for bad in (True, 4.0, 1, 9):
        with pytest.raises(qatlab.ConfigError):
            check_bits(bad)
    opt = LogAdam([nn.Parameter(torch.tensor(1.0))])
    assert (opt.defaults["lr"], opt.defaults["eps"], opt.defaults["betas"]) == (
        1e-3,
        1e-8,
        (0.9, 0.999),
    )


def test_kept_weights_are_released_and_names_checked():
    from qatlab.quant.weights import keep_quantized_weights, release

    layer = _layer([0.3, 1.2])
    with keep_quantized_weights(layer) as kept:
        layer(torch.ones(1, 2)).sum().backward()
    assert kept.grads()[""].tolist() == [[1.0, 1.0]]
    release(kept)
    assert layer.kept_qweight is None  # the class default again: graph and tensor dropped
    with pytest.raises(qatlab.ConfigError):
        with keep_quantized_weights(layer, names=["nope"]):
            pass


def test_mse_step_can_pick_the_first_candidate():
    # one far outlier among many small values: the best clip is the smallest, T_1 = max|x| / 100
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(100_000, generator=gen) * 2 - 1) * 10
    x[0] = 1000.0
    assert _mse_reference(x, -8, 7) == pytest.approx(10.0 / 7)
    assert float(static_step(x, "mse", -8, 7)) == pytest.approx(10.0 / 7, rel=1e-6)


def test_remaining_edges():
    # per-channel backward (recomputes x/s): range edges and a step without gradient
    x = torch.tensor([[-9.2, -8.4, 7.4, 7.5]], requires_grad=True)
    fake_quantize(x, torch.tensor([1.0]), -8, 7).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # per-tensor max-abs on a 2-D input: one step from the whole tensor
    q = Quantizer(4, scale="maxabs_ste", role="weight")
    assert float(q.current_step(torch.tensor([[1.0, 2.0], [7.0, -3.0]]))) == pytest.approx(1.0)
    assert Quantizer(4, scale="maxabs", role="weight").integer(
        torch.tensor([7.0, 3.4])
    ).tolist() == [7.0, 3.0]
    # LSQ's gradient scale on a one-element weight, and on an LSQ+ quantizer
    one = _ready(Quantizer(4, role="weight"), 1.0)
    one(torch.tensor([0.3])).sum().backward()
    assert float(one.step.grad) == pytest.approx(-0.3 / math.sqrt(7), rel=1e-5)
    plus = _ready(Quantizer(4, scale="lsq+", role="weight"), 0.5, -1.0)
    plus(torch.tensor([0.1, -0.3, 8.0])).sum().backward()
    assert float(plus.step.grad) == pytest.approx(14.4 / math.sqrt(3 * 15), rel=1e-5)
    # mse_step's own default is per tensor; cosine_ramp's peak is 1
    from qatlab.quant.quantizer import mse_step

    assert mse_step(torch.tensor([[7.0, 1.0], [3.0, 2.0]]), -8, 7).shape == ()
    assert cosine_ramp(1.0) == pytest.approx(1.0)
    # percentile on more than 2^20 values: a random subsample of 2^20 (median within 1%)
    big = torch.arange(1_200_000, dtype=torch.float32)
    assert float(static_step(big, "percentile", 0, 1, percentile=50.0)) == pytest.approx(
        600_000, rel=0.01
    )


def test_dampening_gradient_scale_of_small_kernels():
    col = qatlab.quantize(nn.Linear(1, 2, bias=False), qatlab.QuantConfig(**_ALL_SAME))
    with torch.no_grad():
        col.weight.copy_(torch.tensor([[0.3], [0.8]]))
        col.weight_quantizer.step.fill_(1.0)
    for how in ("kernel_mean", "sum"):  # kernels of one weight: factor 1
        (g,) = torch.autograd.grad(OscillationDampening(aggregation=how).penalty(col), col.weight)
        assert g.reshape(-1).tolist() == pytest.approx([0.6, -0.4]), how
    one = _layer([0.3])
    (g,) = torch.autograd.grad(OscillationDampening(aggregation="mean").penalty(one), one.weight)
    assert float(g) == pytest.approx(0.6)
    assert float(bin_distance(col.weight, col.weight_quantizer)) == pytest.approx(0.13)


def test_state_buffers_are_named_per_layer():
    model = qatlab.quantize(
        nn.Sequential(
            nn.Linear(2, 2, bias=False),
            nn.Sequential(nn.Linear(2, 2, bias=False)),
            nn.Linear(2, 2, bias=False),
        ),
        qatlab.QuantConfig(weights_only=True),
    )
    with torch.no_grad():
        for i, m in enumerate([model[0], model[1][0], model[2]]):
            m.weight.fill_(float(i))
            m.weight_quantizer.step.fill_(1.0)
    counter = TransitionCounter(model)  # the pinned first and last layers are left out
    assert counter.layer_names == ["1.0"] and hasattr(counter, "1__0__prev")
    assert counter.previous("1.0").tolist() == [[1, 1], [1, 1]]
    every = TransitionCounter(model, include_pinned=True)
    assert [every.previous(n)[0, 0].item() for n in every.layer_names] == [0, 1, 2]
    assert TransitionCounter(model, include_pinned=True, names=["2"]).layer_names == ["2"]
    assert hasattr(TransitionCounter(_layer([0.0])), "root__prev")
    assert IterativeFreezing(model, log_every=3).log_every == 3


def test_last_edges():
    from qatlab.quant.transitions import counted_layers
    from qatlab.quant.weights import keep_quantized_weights, release

    q = Quantizer(4, scale="maxabs_ste", role="weight")
    step = q.current_step(torch.tensor([[1.0, 2.0], [7.0, -3.0]]), grad=True)
    assert float(step) == pytest.approx(1.0)  # one step from the whole tensor
    model = qatlab.quantize(
        nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)),
        qatlab.QuantConfig(weights_only=True),
    )
    assert [n for n, _ in counted_layers(model)] == ["1.0"]  # pinned layers left out by default
    assert hasattr(OscillationTracker(model), "1__0__freq")
    layer = _layer([0.3])
    with keep_quantized_weights(layer) as kept:
        layer(torch.ones(1, 1))
    release(kept)
    release(kept)  # twice: nothing left to drop, no error


@pytest.mark.parametrize("per_channel", [False, True])
def test_floor_inside_the_kernel_is_clamp_min_before_it(per_channel):
    """``fake_quantize(..., floor=f)`` (the quantizer's 1e-8 guard inside the LSQ kernel) gives
    the values and gradients of ``clamp_min(step, f)`` followed by the kernel: a step below the
    floor quantizes with the floor and gets no gradient (clamp_min's rule), one above is
    untouched. x = [-1.2, 0.3, 0.9, 2.0] per row, 3 bits signed (n=-4, p=3), floor 0.25."""
    x = torch.tensor([[-1.2, 0.3, 0.9, 2.0], [0.1, -0.6, 0.7, 1.4]], requires_grad=True)
    steps = [0.5, 0.1] if per_channel else [0.1]  # 0.1 is held at the floor 0.25
    step = torch.tensor(steps if per_channel else steps[0])  # per channel: one step per row
    step.requires_grad_(True)
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, -1.0, 0.5]])
    out = fake_quantize(x, step, -4, 3, grad_scale=0.5, floor=0.25)
    (out * g).sum().backward()
    # by hand, floor held: s = 0.25 -> round(x/s) clamped to [-4, 3] times s
    row_held = [-1.0, 0.25, 0.75, 0.75] if not per_channel else None
    if per_channel:  # row 0 at s = 0.5: [-1.0, 0.5, 1.0, 1.5]; row 1 held at 0.25
        assert out.tolist()[0] == [-1.0, 0.5, 1.0, 1.5]
        assert out.tolist()[1] == pytest.approx([0.0, -0.5, 0.75, 0.75])
        # row 0's LSQ step gradient: sum g*(q - x/s) inside, g*q outside, times grad_scale
        # x/s = [-2.4, 0.6, 1.8, 4.0] -> q = [-2, 1, 2, 3]; inside: first three
        expected = 0.5 * (1.0 * 0.4 + -2.0 * 0.4 + 0.5 * 0.2 + 3.0 * 3)
        assert step.grad[0].item() == pytest.approx(expected)
        assert step.grad[1].item() == 0.0  # below the floor: clamp_min passes nothing
    else:
        assert out.tolist()[0] == pytest.approx(row_held)
        assert step.grad.item() == 0.0
    # the input gradient: g inside the clipping range of the step in use, else 0
    ref_x = x.detach().clone().requires_grad_(True)
    ref_step = step.detach().clone().requires_grad_(True)
    ref = fake_quantize(ref_x, ref_step.clamp_min(0.25), -4, 3, grad_scale=0.5)
    (ref * g).sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_x.grad)
    assert torch.equal(step.grad, ref_step.grad)


def test_floor_leaves_a_step_above_it_alone():
    """Per tensor on the CPU fast path, a step above the floor: values and both gradients are
    the unfloored kernel's, bit for bit."""
    x = torch.tensor([-1.2, 0.3, 0.9, 2.0, -0.1], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, 2.0])
    grads = []
    for floor in (0.25, None):
        x.grad = None
        step = torch.tensor(0.5, requires_grad=True)
        out = fake_quantize(x, step, -4, 3, grad_scale=0.5, floor=floor)
        (out * g).sum().backward()
        grads.append((out.detach(), x.grad.clone(), step.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # x/s = [-2.4, 0.6, 1.8, 4.0, -0.2]: q = [-2, 1, 2, 3, 0]; 0.5 * (0.4 - 0.8 + 0.1 + 9 + 0.4)
    assert grads[0][2].item() == pytest.approx(0.5 * 9.1)


def test_loaded_frozen_masks_take_effect():
    # freeze weight 0 at integer 2 (as in test_freezing_at_a_known_step_and_integer), then load
    # the state into a fresh freezer that would freeze nothing itself: it writes weight 0 back
    layer = _layer([2.0, -5.0])
    kw = dict(momentum=0.25, threshold_end=0.578125, start=0.0, max_bits=4)
    fr = IterativeFreezing(layer, threshold_start=0.578125, **kw)
    for t, v in enumerate([3.0, 2.0, 3.0, 2.0, 3.0]):
        _set(layer, [v, -4.0 + t])
        fr.after_step(layer, t, 1000)
    fresh = IterativeFreezing(layer, threshold_start=0.578125, **kw)
    assert not fresh._may_be_frozen
    fresh.load_state_dict(fr.state_dict())
    (name,) = fresh.layer_names
    assert fresh.frozen(name)[0].tolist() == [True, False] and fresh._may_be_frozen is True
    assert fresh.frequencies().tolist() == [0.68359375, 0.0]  # the loaded EMA, flat
    _set(layer, [6.0, 1.0])
    fresh.after_step(layer, 5, 1000)
    assert layer.weight.tolist() == [[2.0, 1.0]]


def test_log_every_and_dampen_check():
    from qatlab.errors import ConfigError
    from qatlab.methods.oscillation import _check_dampen, _log_every

    assert _log_every(7, 1000) == 7 and _log_every(1, 1000) == 1
    assert _log_every(0, 1000) == 10 and _log_every(0, 199) == 1 and _log_every(0, 50) == 1
    assert _log_every(0, 250) == 2 and _log_every(-3, 300) == 3
    for agg in ("kernel_mean", "mean", "sum"):
        _check_dampen(aggregation=agg)
    with pytest.raises(ConfigError):
        _check_dampen(aggregation="max")
