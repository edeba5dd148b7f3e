"""Oscillations (Nagel et al.): tracker on the 1-D toy, dampening gradient, freezing, state."""

from __future__ import annotations

import torch
from torch import nn

import qatlab
from qatlab.methods.oscillation import (
    IterativeFreezing,
    OscillationDampening,
    OscillationTracker,
    bin_distance,
    cosine_decay,
    cosine_ramp,
)

_ALL_SAME = dict(first_layer="same", last_layer="same", weights_only=True)


def _toy(optimum: float = 0.4):
    """1-D regression y = optimum * x with a 4-bit weight whose grid has step 1.

    The optimum lies between the grid points 0 and 1, so under the STE the quantized weight
    flips between them forever (the spec's first test of a tracker).
    """
    torch.manual_seed(0)
    layer = qatlab.quantize(nn.Linear(1, 1, bias=False), qatlab.QuantConfig(**_ALL_SAME))
    with torch.no_grad():
        layer.weight.fill_(0.3)
        layer.weight_quantizer.step.fill_(1.0)
    layer.weight_quantizer.step.requires_grad_(False)
    x = torch.linspace(-1, 1, 64)[:, None]
    return layer, x, optimum * x


def _train(layer, x, y, hooks, steps=600, lr=0.2):
    opt = torch.optim.SGD([layer.weight], lr=lr)
    history = []
    for step in range(steps):
        opt.zero_grad()
        loss = (layer(x) - y).pow(2).mean()
        for h in hooks:
            extra = h.loss_term(layer, step, steps)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        opt.step()
        for h in hooks:
            h.after_step(layer, step, steps)
        history.append(int(layer.weight_int()))
    return history


def test_tracker_sees_toy_oscillation_and_time_share_tracks_optimum():
    layer, x, y = _toy(0.4)
    tracker = OscillationTracker(layer, momentum=0.01)
    history = _train(layer, x, y, [tracker])
    late = history[200:]
    assert set(late) == {0, 1}  # flips between the two neighbouring grid points
    flips = sum(a != b for a, b in zip(late, late[1:], strict=False))
    assert flips > 50
    freq = float(tracker.frequencies()[0])
    assert freq > 0.1  # a weight that flips every few steps
    assert tracker.oscillating_share(0.05) == 1.0
    # fraction of time on the upper point tracks the optimum's position between 0 and 1
    assert abs(sum(late) / len(late) - 0.4) < 0.15


def test_tracker_is_quiet_when_optimum_is_on_grid():
    layer, x, y = _toy(1.0)
    tracker = OscillationTracker(layer, momentum=0.01)
    _train(layer, x, y, [tracker])
    assert float(tracker.frequencies()[0]) < 0.01


def test_freezing_stops_the_flips():
    layer, x, y = _toy(0.4)
    freezer = IterativeFreezing(
        layer, momentum=0.01, threshold_start=0.05, threshold_end=0.02, start=0.25
    )
    history = _train(layer, x, y, [freezer])
    assert freezer.frozen_share() == 1.0
    first_frozen = next(i for i in range(len(history)) if all(h == history[i] for h in history[i:]))
    assert first_frozen < 500 and len(set(history[first_frozen:])) == 1
    assert history[first_frozen] in (0, 1)


def test_frozen_weights_get_no_task_gradient_and_keep_their_integer():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    q = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=3, act_bits=None, weights_only=True))
    freezer = IterativeFreezing(
        q, momentum=0.5, threshold_start=1e-9, threshold_end=1e-9, start=0.0
    )
    assert freezer.layer_names == ["2"]  # first/last layers are 8-bit: not tracked
    mask = freezer.frozen("2")
    mask[:4] = True  # freeze four output rows by hand
    freezer.buffer("2", "frozen_int")[:4] = q[2].weight_int()[:4].to(torch.int8)
    frozen_before = q[2].weight_int()[:4].clone()
    # the step sizes on their own recipe: at the weights' lr 0.5 they would collapse, the
    # step-size guard would hold them, and dead units would hide the gradient checked below
    opt = qatlab.optimizer(q, "sgd", lr=0.5, momentum=0.9)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for step in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(q(x), y).backward()
        assert (q[2].weight.grad[:4] == 0).all()
        assert q[2].weight.grad[4:].abs().sum() > 0
        opt.step()
        freezer.after_step(q, step, 20)
        assert torch.equal(q[2].weight_int()[:4], frozen_before)
    # integers of frozen weights survive inspection
    info = {i.name: i for i in qatlab.inspect(q, tensors=True)}
    assert torch.equal(info["2"].weight_int[:4].float(), frozen_before)


def test_dampening_gradient_is_twice_distance_to_bin_centre_inside_and_zero_clipped():
    torch.manual_seed(2)
    q = qatlab.quantize(nn.Linear(8, 4), qatlab.QuantConfig(weight_bits=3, **_ALL_SAME))
    with torch.no_grad():
        q.weight.mul_(4)  # make some weights clip
        q.weight_quantizer.step.fill_(0.1)
    n, p = q.weight_quantizer.grid_range
    w = q.weight.detach()
    w_q = torch.clamp(torch.round(w / 0.1), n, p) * 0.1
    inside = (w >= n * 0.1) & (w <= p * 0.1)
    assert inside.any() and (~inside).any()
    for agg, factor in [("sum", 1.0), ("mean", 1 / w.numel()), ("kernel_mean", 1 / w.shape[1])]:
        q.weight.grad = None
        bin_distance(q.weight, q.weight_quantizer, agg).backward()
        expected = torch.where(inside, 2 * (w - w_q) * factor, torch.zeros_like(w))
        assert torch.allclose(q.weight.grad, expected, atol=1e-6), agg
        assert q.weight_quantizer.step.grad is None  # the step is held constant


def test_dampening_schedule_and_skip():
    damp = OscillationDampening(lambda_max=0.1)
    layer, _, _ = _toy()
    assert damp.loss_term(layer, 10, 100) is None  # off for the first 25%
    assert abs(damp.weight(100, 100) - 0.1) < 1e-9
    assert 0 < damp.weight(50, 100) < 0.1
    assert float(damp.loss_term(layer, 99, 100).detach()) > 0
    assert abs(cosine_ramp(0.625) - 0.5 * cosine_ramp(1.0)) < 1e-12
    assert cosine_decay(0.2, 0.1, 0.01) == float("inf")
    assert abs(cosine_decay(1.0, 0.1, 0.01) - 0.01) < 1e-12


def test_tracker_state_survives_save_and_load():
    layer, x, y = _toy(0.4)
    tracker = OscillationTracker(layer, momentum=0.01)
    _train(layer, x, y, [tracker], steps=100)
    state = {k: v.clone() for k, v in tracker.state_dict().items()}
    fresh = OscillationTracker(layer, momentum=0.01)
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    tracker.update(layer)
    fresh.update(layer)
    assert torch.equal(tracker.frequencies(), fresh.frequencies())
    assert float(fresh.frequencies()[0]) > 0
