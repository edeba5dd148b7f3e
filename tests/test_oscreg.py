"""Oscillation regularizer (Wenshøj et al.): gradient, sign vs dampening, exclusions, safety."""

from __future__ import annotations

import torch
from torch import nn

from qatlab.methods.oscillation import bin_distance
from qatlab.methods.oscreg import OscillationRegularizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    )


def _ternary(w):
    s = w.abs().max() / 1
    return torch.clamp(torch.round(w / s), -1, 1) * s


def test_gradient_is_two_times_q_minus_w_over_numel_per_layer():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=2, lam=1.0)
    model(torch.randn(2, 1, 8))
    reg.loss_term(model, 0, 10).backward()
    for name in ("0", "4", "6"):
        w = model.get_submodule(name).weight
        expected = 2 * (_ternary(w.detach()) - w.detach()) / w.numel()
        assert torch.allclose(w.grad, expected, atol=1e-7), name
    # norm layers are never regularized
    assert model[1].weight.grad is None and model[5].weight.grad is None


def test_regularizer_gradient_is_exact_negative_of_dampening():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=3, lam=1.0)
    w = model[4].weight
    reg.penalty(["4"]).backward()
    g_reg = w.grad.clone()
    w.grad = None
    bin_distance(w, reg.quantizer("4"), "mean").backward()
    assert torch.equal(g_reg, -w.grad)
    assert g_reg.abs().sum() > 0


def test_value_is_r_and_zero_in_eval_mode():
    model = _model()
    reg = OscillationRegularizer(model, target_bits=2, lam=3.0)
    expected = sum(
        float((_ternary(m.weight.detach()) ** 2).mean() - (m.weight.detach() ** 2).mean())
        for m in (model[0], model[4], model[6])
    )
    assert abs(reg.value() - expected) < 1e-6
    model.eval()
    model(torch.randn(2, 1, 8))
    assert reg.loss_term(model, 0, 10) is None


def test_unused_layer_is_not_regularized():
    model = _model().train()
    extra = nn.Linear(3, 3)
    model.add_module("unused", extra)
    reg = OscillationRegularizer(model, target_bits=2)
    model[:-1](torch.randn(2, 1, 8))  # everything but the unused layer runs
    reg.loss_term(model, 0, 10).backward()
    assert extra.weight.grad is None
    assert model[0].weight.grad is not None


def test_all_zero_weight_is_finite():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    nn.init.zeros_(model[0].weight)
    reg = OscillationRegularizer(model, target_bits=2)
    model(torch.randn(1, 4))
    loss = reg.loss_term(model, 0, 1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model[0].weight.grad).all()
    assert reg.value() == 0.0
