"""Oscillation regularizer (Wenshøj et al.): gradient, sign vs dampening, exclusions, safety."""

from __future__ import annotations

import pytest
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


def test_constant_step_gradient_is_two_times_q_minus_w_over_numel_per_layer():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=2, lam=1.0, step_grad=False)
    model(torch.randn(2, 1, 8))
    reg.loss_term(model, 0, 10).backward()
    for name in ("0", "4", "6"):
        w = model.get_submodule(name).weight
        expected = 2 * (_ternary(w.detach()) - w.detach()) / w.numel()
        assert torch.allclose(w.grad, expected, atol=1e-7), name
    # norm layers are never regularized
    assert model[1].weight.grad is None and model[5].weight.grad is None


def test_constant_step_gradient_is_exact_negative_of_dampening():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=3, lam=1.0, step_grad=False)
    w = model[4].weight
    reg.penalty(["4"]).backward()
    g_reg = w.grad.clone()
    w.grad = None
    bin_distance(w, reg.quantizer("4"), "mean").backward()
    assert torch.allclose(g_reg, -w.grad, atol=1e-9)
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


class _RoundSTE(torch.autograd.Function):
    """The authors' rounding: forward round, backward identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _authors_penalty(weights, bits):
    """Wenshøj et al.'s formula, re-implemented: s = max|W| / (2^(b-1)-1) NOT detached,
    q = RoundSTE(W/s) * s, R = sum_layers mean(q^2 - W^2)."""
    total = 0.0
    for w in weights:
        s = torch.max(torch.abs(w)) / (2 ** (bits - 1) - 1)
        q = _RoundSTE.apply(w / s) * s
        total = total + torch.mean(q**2 - w**2)
    return total


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_gradient_equals_authors_formula_including_the_step_term(bits):
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=bits, lam=1.0)
    assert reg.step_grad  # the authors' gradient is the default
    model(torch.randn(2, 1, 8))
    loss = reg.loss_term(model, 0, 10)
    loss.backward()
    names = ("0", "4", "6")
    ours = {n: model.get_submodule(n).weight.grad.clone() for n in names}
    copies = {n: model.get_submodule(n).weight.detach().clone().requires_grad_(True) for n in names}
    ref = _authors_penalty(list(copies.values()), bits)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-6
    for n in names:
        w = copies[n].detach()
        assert torch.allclose(ours[n], copies[n].grad, atol=1e-7), n
        # the step term: only the largest |w| differs from 2(q-w)/numel
        const = 2 * (reg.quantizer(n).quantize_detached(w) - w) / w.numel()
        diff = (ours[n] - const).abs()
        top = w.abs() == w.abs().max()
        assert torch.allclose(diff[~top], torch.zeros(()), atol=1e-7), n
        assert float(diff[top].max()) > 1e-5, n


def test_uniform_aggregation_pulls_every_weight_equally():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=2, step_grad=False, aggregation="uniform")
    reg.penalty().backward()
    sizes = [model.get_submodule(n).weight.numel() for n in ("0", "4", "6")]
    mean_size = sum(sizes) / 3
    for name in ("0", "4", "6"):
        w = model.get_submodule(name).weight
        expected = 2 * (_ternary(w.detach()) - w.detach()) / mean_size
        assert torch.allclose(w.grad, expected, atol=1e-7), name


def test_stats_log_gradient_ratio_bin_position_and_range():
    model = _model().train()
    reg = OscillationRegularizer(model, target_bits=2, lam=2.0, stats_every=5)
    x, y = torch.randn(4, 1, 8), torch.tensor([0, 1, 2, 0])
    task = nn.functional.cross_entropy(model(x), y)
    task_grads = torch.autograd.grad(task, [model[4].weight], retain_graph=True)
    term = reg.loss_term(model, 5, 10)
    (task + term).backward()
    stats = reg.after_step(model, 5, 10)
    w = model[4].weight.detach()
    reg_grad = model[4].weight.grad - task_grads[0]
    assert abs(stats["reg_ratio/4"] - float(reg_grad.norm() / task_grads[0].norm())) < 1e-4
    u = w / (w.abs().max() / 1)
    assert abs(stats["bin_pos/4"] - float((u - u.round()).abs().mean())) < 1e-6
    assert abs(stats["max_std/4"] - float(w.abs().max() / w.std())) < 1e-5
    assert reg.after_step(model, 6, 10) is None  # only every stats_every steps
