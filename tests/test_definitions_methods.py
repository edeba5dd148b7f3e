"""The methods' formulas (SAQ, oscillation regularizer, TALR) pinned on hand-made input.

Same rules as ``tests/test_definitions.py``: numbers small enough to work out on paper, the
expected values written out (or recomputed from the formula in a line of plain Python, never
with the code under test), so a plausible one-line change to a formula fails here. They are
the tests ``make mutants`` runs for ``qatlab/methods`` (docs/results/mutation.md).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qatlab
from qatlab.methods import saq as saq_module
from qatlab.methods.oscreg import OscillationRegularizer, PTQAccuracy
from qatlab.methods.saq import SAQ, SAQHook, _call, check
from qatlab.methods.talr import (
    GLOBAL,
    TALR,
    TALRHook,
    default_lambda,
    default_momentum,
    freeze_weight_steps,
    split_groups,
    target_rate,
    torch_optimizers,
)

_SAME = dict(first_layer="same", last_layer="same")
_ALL_SAME = dict(weights_only=True, **_SAME)


def _quantized(model: nn.Module, **kw) -> nn.Module:
    return qatlab.quantize(model, qatlab.QuantConfig(**{**_ALL_SAME, **kw}))


def _layer(weights: list[float], step: float = 1.0) -> nn.Module:
    """A 4-bit quantized ``Linear(k, 1)`` without bias, latent weights ``weights``, step fixed."""
    layer = _quantized(nn.Linear(len(weights), 1, bias=False))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.weight_quantizer.step.fill_(step)
    layer.weight_quantizer.step.requires_grad_(False)
    return layer


def _fill(p: torch.Tensor, values) -> None:
    with torch.no_grad():
        p.copy_(torch.as_tensor(values, dtype=p.dtype).reshape(p.shape))


# ----------------------------------------------------------------------------- SAQ
# Linear(2, 1) without bias, step 1, w = [0.3, 1.2] -> q(w) = [0, 1]; x = [1, 2], y = 3,
# L = (q(w).x - y)^2: first pass out = 2, L = 1, dL/dq = 2 (2 - 3) x = [-2, -4], ||g|| = sqrt(20)
_X, _Y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
_E = [0.5 * g / math.sqrt(20.0) for g in (-2.0, -4.0)]  # rho 0.5: e = [-0.2236, -0.4472]


def _closure(layer, opt, calls: list | None = None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = (layer(_X) - _Y).pow(2).sum()
        loss.backward()
        return loss

    return closure


def test_saq_first_and_second_step_by_hand():
    layer = _layer([0.3, 1.2])
    opt = SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, rho=0.5, ball="raw")
    with opt.first_pass():
        (layer(_X) - _Y).pow(2).sum().backward()
    e = opt.first_step()  # zero_grad=False by default: the first pass's gradient stays
    assert layer.weight.grad.tolist() == [[-2.0, -4.0]]  # STE: dL/dw = dL/dq inside the range
    assert list(e) == [""] and e[""].tolist() == [pytest.approx(_E, rel=1e-5)]
    layer.weight.grad = None
    # second pass at q(w) + e: out = 2 + e.x = 0.8820, dL/dw = 2 (out - 3) x
    out = 2.0 + _E[0] + 2 * _E[1]
    (layer(_X) - _Y).pow(2).sum().backward()
    assert float(layer.weight.grad[0, 0]) == pytest.approx(2 * (out - 3), rel=1e-5)
    opt.second_step(zero_grad=True)
    assert layer.weight.grad is None and opt.steps == 1
    assert layer.weight[0].tolist() == pytest.approx(
        [0.3 - 0.1 * 2 * (out - 3), 1.2 - 0.1 * 4 * (out - 3)], rel=1e-5
    )
    assert layer(_X).item() == pytest.approx(5.0)  # q(w) = [1, 2]; no e left in the forward
    layer.weight.grad = torch.zeros(1, 2)
    opt.second_step()  # zero_grad False: the gradient stays
    assert opt.steps == 2 and layer.weight.grad is not None


def test_saq_first_step_zero_grad():
    layer = _layer([0.3, 1.2])
    opt = SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, rho=0.5, ball="raw")
    with opt.first_pass():
        (layer(_X) - _Y).pow(2).sum().backward()
    opt.first_step(zero_grad=True)
    assert layer.weight.grad is None
    assert layer(_X).item() == pytest.approx(2.0 + _E[0] + 2 * _E[1], rel=1e-5)
    opt.restore()
    assert layer(_X).item() == pytest.approx(2.0)


def test_saq_efficient_variant_reuses_e_by_hand():
    # every=2: step 0 is a full SAQ step (2 passes) and keeps e0 = _E; step 1 is one pass at
    # q(w1) + e0; step 2 is a full step again.
    layer = _layer([0.3, 1.2])
    opt = SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, rho=0.5, every=2, ball="raw")
    calls: list = []
    closure = _closure(layer, opt, calls)
    assert opt.step(closure).item() == pytest.approx(1.0)
    assert len(calls) == 2 and opt.steps == 1
    assert opt.last_e[""].tolist() == [pytest.approx(_E, rel=1e-5)]
    # w1 = w - 0.1 * 2 (out - 3) x with out = 2 + e0.x = 0.88197: [0.72361, 2.04721] -> q = [1, 2]
    out0 = 2.0 + _E[0] + 2 * _E[1]
    w1 = [0.3 - 0.2 * (out0 - 3), 1.2 - 0.4 * (out0 - 3)]
    assert layer.weight[0].tolist() == pytest.approx(w1, rel=1e-5)
    # reused step: one pass at q(w1) + e0: out = 5 + e0.x = 3.88197, L = 0.88197^2 (the logged
    # loss is the perturbed one), w2 = w1 - 0.1 * 2 (out - 3) x
    out1 = 5.0 + _E[0] + 2 * _E[1]
    assert opt.step(closure).item() == pytest.approx((out1 - 3) ** 2, rel=1e-5)
    assert len(calls) == 3 and opt.steps == 2
    w2 = [w1[0] - 0.2 * (out1 - 3), w1[1] - 0.4 * (out1 - 3)]
    assert layer.weight[0].tolist() == pytest.approx(w2, rel=1e-5)
    assert layer(_X).item() == pytest.approx(5.0)  # e0 is not left in the forward
    # its state: steps and e0; a fresh wrapper loading it takes the same (fresh) next step
    state = opt.wrapper_state()
    assert state["steps"] == 2 and state["last_e"][""].tolist() == [pytest.approx(_E, rel=1e-5)]
    other = _layer(layer.weight[0].tolist())
    again = SAQ(torch.optim.SGD([other.weight], lr=0.1), other, rho=0.5, every=2, ball="raw")
    again.load_wrapper_state(state)
    assert again.steps == 2 and again.last_e[""].tolist() == [pytest.approx(_E, rel=1e-5)]
    assert again.last_e[""].dtype == other.weight.dtype
    more: list = []
    again.step(_closure(other, again, more))
    opt.step(closure)
    assert len(more) == 2 and len(calls) == 5  # step 2 is fresh in both
    assert other.weight[0].tolist() == pytest.approx(layer.weight[0].tolist(), rel=1e-6)
    assert opt._tensor("") is layer.weight
    empty = SAQ(torch.optim.SGD([other.weight], lr=0.1), other, rho=0.5, every=2, ball="raw")
    empty.load_wrapper_state({})
    assert empty.steps == 0 and empty.last_e is None
    assert empty.wrapper_state() == {"steps": 0, "last_e": None}
    # a state at an odd step without e (saved with every=1): the next step is a fresh one
    empty.load_wrapper_state({"steps": 1, "last_e": None})
    more.clear()
    empty.step(_closure(other, empty, more))
    assert len(more) == 2 and empty.steps == 2 and empty.last_e is not None
    # e saved in another dtype comes back in the weight's
    empty.load_wrapper_state(
        {"steps": 3, "last_e": {"": torch.tensor([[0.5, 0.25]], dtype=torch.float64)}}
    )
    assert empty.last_e[""].dtype == torch.float32 and empty.last_e[""].tolist() == [[0.5, 0.25]]


def test_saq_full_steps_count_and_keep_no_e():
    # every=1 never keeps e; rho=1 is a full two-pass step; rho=0 one pass, steps counted
    for rho, passes in ((1.0, 2), (0.0, 1)):
        layer = _layer([0.3, 1.2])
        opt = SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, rho=rho, ball="raw")
        calls: list = []
        for _ in range(3):
            opt.step(_closure(layer, opt, calls))
        assert len(calls) == 3 * passes and opt.steps == 3 and opt.last_e is None, rho
    with pytest.raises(ValueError):
        opt.step()


def test_saq_call_passes_sync_only_when_false():
    seen = []

    def closure(sync=True):
        seen.append(sync)
        return sync

    assert _call(closure, True) is True and _call(closure, False) is False
    assert seen == [True, False]


def _extras_model(**values) -> nn.Module:
    """QuantLinear(2, 2) with a learned input step, then LayerNorm(2)."""
    model = qatlab.quantize(
        nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), qatlab.QuantConfig(act_bits=4, **_SAME)
    )
    lin, ln = model
    _fill(lin.weight, values.get("w", [[0.5, -1.5], [0.0, 1.0]]))
    _fill(lin.bias, values.get("b", [1.5, 0.0]))
    _fill(lin.weight_quantizer.step, 0.5)
    _fill(lin.input_quantizer.step, 1.5)
    # gradients, sum of squares 5 + 4 + 4 + 4 + 4 + 4 = 25
    lin.weight.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    lin.bias.grad = torch.tensor([2.0, 0.0])
    lin.weight_quantizer.step.grad = torch.tensor(2.0)
    lin.input_quantizer.step.grad = torch.tensor(2.0)
    ln.weight.grad = torch.tensor([0.0, 2.0])
    ln.bias.grad = torch.tensor([2.0, 0.0])
    return model


_GRADS = {
    "0": [[1.0, 0.0], [0.0, 2.0]],
    "0.bias": [2.0, 0.0],
    "0.weight_quantizer.step": 2.0,
    "0.input_quantizer.step": 2.0,
    "1.weight": [0.0, 2.0],
    "1.bias": [2.0, 0.0],
}
_ALL_EXTRAS = dict(bias=True, norm=True, act_steps=True, weight_steps=True)


def _e(model, **kw) -> dict:
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, case=1, **kw)
    return {k: v.tolist() for k, v in opt.perturbation().items()}


def _scaled(values, factor):
    if isinstance(values, list):
        return [_scaled(v, factor) for v in values]
    return pytest.approx(values * factor, rel=1e-5, abs=1e-7)


def test_saq_ball_members_raw():
    # every member in the ball: ||g|| = 5, e = 0.5 g / 5
    e = _e(_extras_model(), ball="raw", **_ALL_EXTRAS)
    assert e == {k: _scaled(g, 0.1) for k, g in _GRADS.items()}
    # biases only: ||g|| = sqrt(5 + 4) = 3
    e = _e(_extras_model(), ball="raw", bias=True)
    assert e == {k: _scaled(_GRADS[k], 0.5 / 3) for k in ("0", "0.bias")}
    # each option adds its own tensors; a frozen parameter is never in the ball
    model = _extras_model()
    model[1].bias.requires_grad_(False)
    assert set(_e(model, ball="raw", norm=True)) == {"0", "1.weight"}
    assert set(_e(_extras_model(), ball="raw", act_steps=True)) == {"0", "0.input_quantizer.step"}
    assert set(_e(_extras_model(), ball="raw", weight_steps=True)) == {
        "0",
        "0.weight_quantizer.step",
    }
    assert set(_e(_extras_model(), ball="raw")) == {"0"}


@pytest.mark.parametrize("adaptive_bias", [False, True])
def test_saq_adaptive_ball_members_by_hand(adaptive_bias):
    # T = |x| + eta (raw ball, eta 0.5), e = rho T^2 g / ||T g||; adaptive_bias=False leaves the
    # biases (layer and norm) unscaled: their T g and T^2 g are just g.
    t = {
        "0": [[1.0, 2.0], [0.5, 1.5]],  # |w| + 0.5
        "0.bias": [2.0, 0.5],  # |b| + 0.5, b = [1.5, 0]
        "0.weight_quantizer.step": 1.0,  # 0.5 + 0.5
        "0.input_quantizer.step": 2.0,  # 1.5 + 0.5
        "1.weight": [1.5, 1.5],  # LayerNorm weight 1
        "1.bias": [0.5, 0.5],  # LayerNorm bias 0
    }
    if not adaptive_bias:
        t["0.bias"], t["1.bias"] = [1.0, 1.0], [1.0, 1.0]

    def mul(a, b):
        return [mul(x, y) for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a * b

    def sq(a):
        return sum(sq(x) for x in a) if isinstance(a, list) else a * a

    tg = {k: mul(t[k], g) for k, g in _GRADS.items()}
    # ||T g||^2 = 10 + (16 + 1 if adaptive_bias else 4 + 4) + 4 + 16 + 9 = 56 or 47 (by hand)
    norm = math.sqrt(sum(sq(v) for v in tg.values()))
    assert norm == pytest.approx(math.sqrt(56.0 if adaptive_bias else 47.0))
    e = _e(_extras_model(), ball="raw", adaptive=True, eta=0.5, adaptive_bias=adaptive_bias,
           **_ALL_EXTRAS)  # fmt: skip
    assert e == {k: _scaled(mul(t[k], v), 0.5 / norm) for k, v in tg.items()}


def test_saq_std_ball_with_bias_and_weight_step_by_hand():
    # u = unbiased std of w = sqrt(3.5 / 3) for the weight and its step, 1 for the bias;
    # ||u g||^2 = u^2 (5 + 4) + 4 = 14.5; e = 0.5 u^2 g / sqrt(14.5) (bias: 0.5 g / sqrt(14.5))
    u2 = 3.5 / 3
    e = _e(_extras_model(), ball="std", bias=True, weight_steps=True)
    f = 0.5 / math.sqrt(14.5)
    assert e == {
        "0": _scaled(_GRADS["0"], f * u2),
        "0.bias": _scaled(_GRADS["0.bias"], f),
        "0.weight_quantizer.step": _scaled(2.0, f * u2),
    }
    # adaptive in std units: T = |x| + eta u (weight and its step), |b| + eta for the bias
    u = math.sqrt(u2)
    e = _e(_extras_model(), ball="std", bias=True, weight_steps=True, adaptive=True, eta=0.5)
    tw = [[0.5 + 0.5 * u, 1.5 + 0.5 * u], [0.5 * u, 1.0 + 0.5 * u]]
    ts, tb = 0.5 + 0.5 * u, [2.0, 0.5]
    norm = math.sqrt(tw[0][0] ** 2 + (2 * tw[1][1]) ** 2 + (2 * ts) ** 2 + (2 * tb[0]) ** 2)
    assert e == {
        "0": [
            [_scaled(tw[0][0] ** 2, 0.5 / norm), 0.0],
            [0.0, _scaled(2 * tw[1][1] ** 2, 0.5 / norm)],
        ],
        "0.bias": [_scaled(2 * tb[0] ** 2, 0.5 / norm), 0.0],
        "0.weight_quantizer.step": _scaled(2 * ts**2, 0.5 / norm),
    }


def test_saq_units_per_ball():
    model = _quantized(
        nn.Sequential(
            nn.Conv1d(1, 1, 3, bias=False),
            nn.Flatten(),
            nn.Linear(1, 1, bias=False),
            nn.Linear(1, 2, bias=False),
        )
    )
    _fill(model[0].weight, [1.0, 2.0, 3.0])  # std 1
    _fill(model[2].weight, [5.0])  # one weight: no std
    _fill(model[3].weight, [1.0, 3.0])  # std sqrt(2)

    def units(ball, **kw):
        opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball=ball, **kw)
        return {k: float(v) for k, v in opt.units().items()}, opt

    assert units("raw")[0] == {}
    assert units("std")[0] == pytest.approx({"0": 1.0, "3": math.sqrt(2.0)})
    assert units("authors")[0] == pytest.approx({"0": 1.0})  # conv layers only
    got, opt = units("std", weight_steps=True)
    assert got == pytest.approx(
        {"0": 1.0, "3": math.sqrt(2.0), "0.weight_quantizer.step": 1.0,
         "3.weight_quantizer.step": math.sqrt(2.0)}
    )  # fmt: skip
    assert opt.step_of == {"0.weight_quantizer.step": "0", "2.weight_quantizer.step": "2",
                           "3.weight_quantizer.step": "3"}  # fmt: skip
    assert {k: float(v) for k, v in opt.units(["3", "0.bias"]).items()} == pytest.approx(
        {"3": math.sqrt(2.0)}
    )


def _bn_probe() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """QuantLinear(2, 2) -> BatchNorm1d(2) with momentum 1 (running mean = the last batch's),
    q(W) = [[0, 1], [1, -1]] at step 1, a batch x and a loss weighting c (loss = sum(c * out))."""
    model = _quantized(nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2)))
    model[1].momentum = 1.0
    _fill(model[0].weight, [[0.3, 1.2], [1.0, -1.0]])
    _fill(model[0].weight_quantizer.step, 1.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0]])
    return model, x, c


def test_saq_freezes_bn_statistics_in_the_second_pass():
    # QuantLinear(2, 2) -> BatchNorm1d(2, momentum 1: running mean = the last batch's mean).
    # q(W) = [[0, 1], [1, -1]], x = [[1, 2], [3, 0], [0, 1]] -> out = [[2, -1], [0, 3], [1, -1]]:
    # first-pass batch mean [1, 1/3]; the second pass (at q(W) + e) must not overwrite it.
    for bn_update in (False, True):
        model, x, c = _bn_probe()
        opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=0.5, ball="raw",
                  bn_update=bn_update)  # fmt: skip

        def closure(opt=opt, model=model, x=x, c=c):
            opt.zero_grad()
            loss = (model(x) * c).sum()
            loss.backward()
            return loss

        opt.step(closure)
        frozen = model[1].running_mean.tolist() == pytest.approx([1.0, 1 / 3])
        assert frozen != bn_update, bn_update
        assert int(model[1].num_batches_tracked) == (2 if bn_update else 1)


def test_saq_reused_steps_update_bn_statistics():
    model, x, c = _bn_probe()
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=0.5, every=2, ball="raw")

    def closure():
        opt.zero_grad()
        loss = (model(x) * c).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert int(model[1].num_batches_tracked) == 1
    opt.step(closure)  # one pass at q(W) + e0 (lr 0: W unchanged): BN statistics move
    assert int(model[1].num_batches_tracked) == 2
    e0 = opt.last_e["0"]
    qw = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    assert model[1].running_mean.tolist() == pytest.approx(
        (x @ (qw + e0).T).mean(0).tolist(), rel=1e-5
    )


def test_saq_first_pass_sync_and_reduction_under_ddp(monkeypatch):
    # _sync_first_pass: without a process group always synchronised; under DDP only cases 1/2
    # or case 3 with extras (case 3's dL/dq(w) is averaged by _reduce_kept instead)
    layer = _layer([0.3, 1.2])

    def opt(**kw):
        return SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, ball="raw", **kw)

    assert opt(per_replica=True)._sync_first_pass() is True
    monkeypatch.setattr(saq_module, "_distributed", lambda: True)
    assert opt()._sync_first_pass() is False
    assert opt(case=1)._sync_first_pass() is True
    assert opt(per_replica=True)._sync_first_pass() is False
    model = _extras_model()
    with_bias = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, bias=True)
    assert with_bias._sync_first_pass() is True

    class FakeDist:  # two ranks: the other rank's dL/dq(w) is [2, 6]
        @staticmethod
        def all_reduce(t):
            t.add_(torch.tensor([2.0, 6.0]))

        @staticmethod
        def get_world_size():
            return 2

    monkeypatch.setattr(saq_module, "dist", FakeDist)
    o = opt()
    with o.first_pass():
        (layer(_X) - _Y).pow(2).sum().backward()
    o._reduce_kept()
    assert o._kept.grads()[""].tolist() == [[0.0, 1.0]]  # ([-2, -4] + [2, 6]) / 2
    e = o.first_step()
    assert e[""].tolist() == [pytest.approx([0.0, 0.05])]  # rho g / ||g||, g = [0, 1], rho 0.05
    o.restore()
    replica = opt(per_replica=True)
    with replica.first_pass():
        (layer(_X) - _Y).pow(2).sum().backward()
    replica._reduce_kept()  # per replica: no communication
    assert replica._kept.grads()[""].tolist() == [[-2.0, -4.0]]


def test_saq_check_and_hook_options():
    check(0.0, 3, 1, 0.0)  # rho 0 and eta 0 are allowed
    for bad in (dict(rho=-0.1), dict(case=4), dict(every=0), dict(eta=-1.0), dict(ball="x")):
        args = {"rho": 0.05, "case": 3, "every": 1, "eta": 0.01, "ball": "std", **bad}
        with pytest.raises(qatlab.ConfigError):
            check(**args)
    with pytest.raises(qatlab.ConfigError):
        check(0.05, 3, 1, 0.01, "XXrawXX")
    check(0.05, 3, 1, 0.01)  # the default ball "raw" is valid
    with pytest.raises(qatlab.ConfigError):
        SAQHook(ball="x")
    for bad in (dict(rho=-1.0), dict(case=0), dict(every=0), dict(eta=-0.5)):
        with pytest.raises(qatlab.ConfigError):
            SAQHook(**bad)
    SAQHook()  # the defaults are valid
    hook = SAQHook(rho=0.3, every=2)
    assert hook.optimizer is None
    layer = _layer([0.3, 1.2])
    base = torch.optim.SGD([layer.weight], lr=0.1)
    opt = hook.wrap_optimizer(base, layer)
    assert hook.optimizer is opt and opt.base is base and opt.model is layer
    assert (opt.rho, opt.every, opt.case, opt.ball) == (0.3, 2, 3, "std")
    default = SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer)
    assert (default.rho, default.case, default.every, default.eta) == (0.05, 3, 1, 0.01)
    assert (default.adaptive, default.adaptive_bias, default.bn_update) == (False, True, False)
    assert (default.per_replica, default.ball, default.steps, default.last_e) == (
        False, "std", 0, None)  # fmt: skip
    assert default.extras == {} and default.biases == set() and default.step_of == {}
    with pytest.raises(qatlab.ConfigError):
        SAQ(torch.optim.SGD([layer.weight], lr=0.1), nn.Linear(2, 1))
    with pytest.raises(RuntimeError):
        default.perturbation()  # no first pass yet
    with pytest.raises(qatlab.ConfigError):
        SAQ(torch.optim.SGD([layer.weight], lr=0.1), layer, ball="x")
    model = _extras_model()
    extras = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, bias=True, norm=True)
    assert extras._tensor("0") is model[0].weight and extras._tensor("1.bias") is model[1].bias
    assert extras.biases == {"0.bias", "1.bias"}


# ----------------------------------------------------------------------------- oscreg
# two layers, 3-bit restricted grid (p = 3), s = max|W| / 3 = 0.5 for both:
# W0 = [0.6, -0.2, 1.5, 0.9]: u = [1.2, -0.4, 3, 1.8] -> [1, 0, 3, 2], q = [0.5, 0, 1.5, 1]
#   q^2 - W^2 = [-0.11, -0.04, 0, 0.19], mean 0.01; 2 (q - W) / 4 = [-0.05, 0.1, 0, 0.05]
#   step term (argmax i = 2, sign +): 1/3 * 2/4 * sum q (round u - u) = 1/6 * 0.1
# W1 = [0.4, -1.5]: u = [0.8, -3] -> [1, -3], q = [0.5, -1.5]
#   q^2 - W^2 = [0.09, 0], mean 0.045; 2 (q - W) / 2 = [0.1, 0]
#   step term (argmax i = 1, sign -): -1/3 * 2/2 * (0.5 * 0.2 + 0) = -0.1 / 3
_W0, _W1 = [0.6, -0.2, 1.5, 0.9], [[0.4], [-1.5]]
_G0, _G1 = [-0.05, 0.1, 0.0, 0.05], [0.1, 0.0]
_S0, _S1 = 0.1 / 6, -0.1 / 3


def _reg_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(1, 2, bias=False))
    _fill(model[0].weight, _W0)
    _fill(model[1].weight, _W1)
    return model.train()


def _grads(model, term) -> tuple[list[float], list[float]]:
    g0, g1 = torch.autograd.grad(term, [model[0].weight, model[1].weight])
    return g0.reshape(-1).tolist(), g1.reshape(-1).tolist()


@pytest.mark.parametrize("step_grad", [False, True])
@pytest.mark.parametrize("aggregation", ["mean", "uniform"])
def test_oscreg_value_and_gradient_by_hand(step_grad, aggregation):
    model = _reg_model()
    reg = OscillationRegularizer(model, target_bits=3, lam=2.0, step_grad=step_grad,
                                 aggregation=aggregation)  # fmt: skip
    # uniform: layer l weighted by N_l / N_avg, N_avg = (4 + 2) / 2 = 3
    f0, f1 = (4 / 3, 2 / 3) if aggregation == "uniform" else (1.0, 1.0)
    assert reg.layer_term("0").item() == pytest.approx(0.01 * f0)
    assert reg.penalty().item() == pytest.approx(0.01 * f0 + 0.045 * f1)
    assert reg.penalty(["1"]).item() == pytest.approx(0.045 * f1)
    assert reg.value() == pytest.approx(0.055)  # R itself, whatever the aggregation
    model(torch.ones(1, 4))  # both layers run
    term = reg.loss_term(model, 0, 10)
    assert term.item() == pytest.approx(2.0 * (0.01 * f0 + 0.045 * f1))
    g0, g1 = list(_G0), list(_G1)
    if step_grad:
        g0[2] += _S0
        g1[1] += _S1
    got0, got1 = _grads(model, term)
    assert got0 == pytest.approx([2.0 * f0 * g for g in g0], abs=1e-6)
    assert got1 == pytest.approx([2.0 * f1 * g for g in g1], abs=1e-6)


def test_oscreg_only_layers_that_ran_in_training():
    model = _reg_model()
    reg = OscillationRegularizer(model, target_bits=3, lam=1.0, step_grad=False)
    assert reg.loss_term(model, 0, 10) is None  # nothing ran yet
    model[0](torch.ones(1, 4))  # only the first layer runs
    term = reg.loss_term(model, 0, 10)
    assert term.item() == pytest.approx(0.01)
    assert reg.loss_term(model, 1, 10) is None  # the record is cleared after each step
    everything = OscillationRegularizer(model, target_bits=3, only_used=False, step_grad=False)
    assert everything.loss_term(model, 0, 10).item() == pytest.approx(0.055)
    model(torch.ones(1, 4))
    assert OscillationRegularizer(model, lam=0.0).loss_term(model, 0, 10) is None
    model.eval()
    model(torch.ones(1, 4))
    assert reg.loss_term(model, 2, 10) is None
    model.train()
    model[1](torch.ones(1, 1))
    assert reg.loss_term(model, 3, 10).item() == pytest.approx(0.045)  # eval cleared layer 0


def test_oscreg_quantizer_defaults():
    reg = OscillationRegularizer(_reg_model())
    q = reg.quantizer("0")
    assert (reg.target_bits, reg.lam, reg.grid, reg.only_used) == (3, 1.0, "restricted", True)
    assert (reg.step_grad, reg.aggregation, reg.stats_every) == (True, "mean", 0)
    assert (q.bits, q.grid_range, q.role, q.policy) == (3, (-3, 3), "weight", "maxabs_ste")
    assert reg.quantizer("1").policy == "maxabs_ste"
    assert OscillationRegularizer(_reg_model(), step_grad=False).quantizer("0").policy == "maxabs"
    two = OscillationRegularizer(_reg_model(), target_bits=2, grid="full")
    assert two.quantizer("0").grid_range == (-2, 1)
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    assert OscillationRegularizer(nested).quantizer("0.0").bits == 3
    assert float(OscillationRegularizer(nn.Sequential(nn.ReLU())).penalty()) == 0.0
    with pytest.raises(ValueError):
        OscillationRegularizer(_reg_model(), aggregation="sum")
    # one layer: uniform = mean (N / N_avg = 1)
    single = nn.Sequential(nn.Linear(4, 1, bias=False))
    _fill(single[0].weight, _W0)
    uniform = OscillationRegularizer(single, aggregation="uniform")
    assert uniform.penalty().item() == pytest.approx(0.01)


def test_oscreg_on_the_lsq_grid_by_hand():
    # grid="lsq": the layer's own quantizer (step 1): q = [0, 1], term = -mean((q - w)^2)
    # = -(0.09 + 0.04) / 2, gradient 2 (q - w) / 2 = [-0.3, -0.2]; the step gets no gradient
    layer = _layer([0.3, 1.2])
    layer.weight_quantizer.step.requires_grad_(True)
    reg = OscillationRegularizer(layer, grid="lsq", step_grad=True)
    assert reg.step_grad is False and len(reg.quantizers) == 0
    assert reg.quantizer("") is layer.weight_quantizer
    term = reg.layer_term("")
    assert term.item() == pytest.approx(-0.065)
    term.backward()
    assert layer.weight.grad.tolist() == [pytest.approx([-0.3, -0.2])]
    assert layer.weight_quantizer.step.grad is None
    assert reg.value() == pytest.approx((1.0 - 0.09 - 1.44) / 2)  # mean(q^2) - mean(w^2)
    with pytest.raises(ValueError):
        OscillationRegularizer(nn.Linear(2, 1), grid="lsq")
    with pytest.raises(ValueError):  # every layer must be quantized, not only the first
        OscillationRegularizer(nn.Sequential(_layer([0.3]), nn.Linear(1, 1)), grid="lsq")
    # two rows: the mean over all 4 weights (not a mean per kernel summed over kernels)
    rows = _quantized(nn.Linear(2, 2, bias=False))
    _fill(rows.weight, [[0.3, 1.2], [0.3, 1.2]])
    _fill(rows.weight_quantizer.step, 1.0)
    assert OscillationRegularizer(rows, grid="lsq").layer_term("").item() == pytest.approx(-0.065)


def test_oscreg_statistics_by_hand():
    # bin position mean |u - round u|: layer 0 [0.2, 0.4, 0, 0.2] -> 0.2, layer 1 [0.2, 0] -> 0.1
    # max|W| / std(W): 1.5 / sqrt(0.5) (unbiased std of W0), 1.5 / (1.9 / sqrt 2) for W1
    model = _reg_model()
    reg = OscillationRegularizer(model, target_bits=3, lam=1.0, step_grad=False, stats_every=2)
    stats = reg.layer_stats()
    assert stats == pytest.approx({"bin_pos/0": 0.2, "bin_pos/1": 0.1,
                                   "max_std/0": 1.5 / math.sqrt(0.5),
                                   "max_std/1": 1.5 * math.sqrt(2) / 1.9})  # fmt: skip
    # step 1: no statistics; step 2: the task gradient c = [1, 0, 0, 0] and [0, 2] plus
    # lam dR/dW: ratio ||dR/dW|| / ||task||
    model(torch.ones(1, 4))
    assert reg.loss_term(model, 1, 10) is not None and reg._reg_grads == {}
    assert reg.after_step(model, 1, 10) is None
    model(torch.ones(1, 4))
    term = reg.loss_term(model, 2, 10)
    task = model[0].weight[0, 0] + 2 * model[1].weight[1, 0]
    (term + task).backward()
    out = reg.after_step(model, 2, 10)
    assert out == pytest.approx({**stats,
                                 "reg_ratio/0": math.sqrt(0.05**2 + 0.1**2 + 0.05**2) / 1.0,
                                 "reg_ratio/1": 0.1 / 2.0})  # fmt: skip
    assert reg._reg_grads == {}
    # a layer without a gradient is skipped, the others still reported
    model(torch.ones(1, 4))
    term = reg.loss_term(model, 4, 10)
    (term + model[0].weight[0, 0] + 2 * model[1].weight[1, 0]).backward()
    model[0].weight.grad = None
    assert set(reg.after_step(model, 4, 10)) == set(stats) | {"reg_ratio/1"}
    # a one-weight layer has no std; a layer without task gradient has an infinite ratio
    one = nn.Sequential(nn.Linear(1, 1, bias=False))
    _fill(one[0].weight, [0.7])
    small = OscillationRegularizer(one, target_bits=3, stats_every=1, step_grad=False)
    assert small.layer_stats() == {"bin_pos/0": 0.0, "max_std/0": 0.0}
    one(torch.ones(1, 1))
    small.loss_term(one, 0, 10).backward()
    assert small.after_step(one, 0, 10)["reg_ratio/0"] == float("inf")  # q = w: reg = task = 0


def test_ptq_accuracy_metric_name(monkeypatch):
    from qatlab.methods import oscreg

    seen = []
    fake = lambda m, d, b, bs: seen.append((m, d, b, bs)) or 0.5  # noqa: E731
    monkeypatch.setattr(oscreg, "ptq_accuracy", fake)
    data = type("Data", (), {"val": "VAL"})()
    assert PTQAccuracy(3).eval_metrics("M", data, "val") == {"ptq3_acc": 0.5}
    assert PTQAccuracy(2, batch_size=7).eval_metrics("M", data, "val") == {"ptq2_acc": 0.5}
    assert seen == [("M", "VAL", 3, 512), ("M", "VAL", 2, 7)]


# ----------------------------------------------------------------------------- TALR
def test_target_rate_schedules_by_hand():
    # cosine R_0 (1 + cos(pi t / T)) / 2; step R_0 gamma^(milestones passed); clamped progress
    assert target_rate(250, 1000, 0.2) == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert target_rate(0, 1000, 0.2) == pytest.approx(0.2)
    assert target_rate(-5, 1000, 0.2) == pytest.approx(0.2)
    assert target_rate(1000, 1000, 0.2) == pytest.approx(0.0, abs=1e-15)
    assert target_rate(2000, 1000, 0.2) == pytest.approx(0.0, abs=1e-15)
    assert target_rate(1, 0, 0.2) == pytest.approx(0.0, abs=1e-15)  # T = 0 counts as 1
    assert target_rate(0, 0, 0.2) == pytest.approx(0.2)
    step = [target_rate(t, 1000, 0.2, "step") for t in (0, 499, 500, 749, 750, 2000)]
    assert step == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002, 0.002])
    assert target_rate(600, 1000, 0.2, "step", (0.25,), 0.5) == pytest.approx(0.1)
    assert target_rate(600, 1000, 0.2, "constant") == 0.2
    with pytest.raises(ValueError):
        target_rate(0, 10, 0.2, "linear")


def test_default_momentum_window():
    # tracking: 1 - 1/w, w = clamp(T / 50, 10, 100); paper: 0.99
    assert default_momentum("paper", 100) == 0.99
    assert default_momentum("tracking", 100) == pytest.approx(0.9)  # w 10 (2 -> 10)
    assert default_momentum("tracking", 1000) == pytest.approx(0.95)  # w 20
    assert default_momentum("tracking", 2500) == pytest.approx(0.98)  # w 50
    assert default_momentum("tracking", 100_000) == pytest.approx(0.99)  # w 100


def _talr(layer=None, lr=0.1, **kw) -> TALR:
    layer = layer if layer is not None else _layer([0.52, 1.2])
    kw.setdefault("momentum", 0.5)
    return TALR(torch.optim.SGD([layer.weight], lr=lr), layer, kw.pop("total_steps", 8), **kw)


def _schedule(*factors):
    """A schedule ``R_t = R_0 * factors[t]`` that checks it is called with T = 8."""

    def schedule(t, total, r0):
        assert total == 8
        return r0 * factors[t]

    return schedule


def test_talr_paper_law_by_hand():
    # K_t = m K + (1 - m) k_t, U_{t+1} = max(0, U_t + eta (R_t - K_t)); m 0.5, eta 0.1,
    # U_0 = 0.1 (the LR), R_0 = lam sqrt(4) = 0.2, R_t = 0.2, 0.1, 0.05
    opt = _talr(controller="paper", lam=0.1, eta=0.1, schedule=_schedule(1.0, 0.5, 0.25, 1.0))
    assert opt.R0 == {GLOBAL: pytest.approx(0.2)}
    expected = [  # k_t, K_t, U_{t+1}
        (0.6, 0.3, 0.1 + 0.1 * (0.2 - 0.3)),  # 0.09
        (0.0, 0.15, 0.09 + 0.1 * (0.1 - 0.15)),  # 0.085
        (1.0, 0.575, 0.085 + 0.1 * (0.05 - 0.575)),  # 0.0325
    ]
    rbar = 0.0
    for t, (k, K, U) in enumerate(expected):
        opt.observe({GLOBAL: k})
        rbar = 0.5 * rbar + 0.5 * 0.2 * [1.0, 0.5, 0.25][t]
        assert float(opt.K[GLOBAL]) == pytest.approx(K)
        assert float(opt.U[GLOBAL]) == pytest.approx(U)
        assert float(opt.k[GLOBAL]) == k and opt.k[GLOBAL].dtype == torch.float64  # no float32
        assert opt.R[GLOBAL] == pytest.approx(0.2 * [1.0, 0.5, 0.25][t])
        assert opt.Rbar[GLOBAL] == pytest.approx(rbar)
        assert opt.t == t + 1
    # a large gain overshoots below 0: U = max(0, 0.1 + 1 (0.2 - 0.5)) = 0
    big = _talr(controller="paper", lam=0.1, eta=1.0, schedule="constant")
    big.observe({GLOBAL: 1.0})
    assert float(big.U[GLOBAL]) == 0.0
    assert big.eta == 1.0 and _talr(controller="paper").eta == pytest.approx(0.1)  # eta: the LR
    assert big.m == 0.5 and _talr(controller="paper", momentum=None).m == 0.99


def test_talr_tracking_law_by_hand():
    # m 0.5, c 2, U_0 0.1, u_max 0.16; R_t = 0.2 * factors[t]; each step t (using U_t):
    #   A = m A + (1 - m) k / U, W = m W + (1 - m)  (only if U_t > 0), a = A / W
    #   U_{t+1} = clip(R_{t+1} / a, [U_t / c, c U_t]), <= u_max; 0 if R_{t+1} = 0
    # t=0: k .1, U .1: A .5, W .5, a 1, R_1 .15: ratio .15 in [.05, .2]          -> .15
    # t=1: k .6, U .15: A 2.25, W .75, a 3, R_2 .15: ratio .05 < .075 = U/c      -> .075
    # t=2: k 0, U .075: A 1.125, W .875, a 9/7, R_3 .9: ratio .7 > .15 = c U     -> .15
    # t=3: k .15, U .15: A 1.0625, W .9375, a 17/15, R_4 = 0                     -> 0
    # t=4: U 0: A, W unchanged, R_5 .1: ratio .1 * 15/17 (from 0: no lower/upper) -> .088235
    # t=5: k .01, U .088235: A .5879167, W .96875, R_6 .5: ratio .824, c U .176 -> u_max .16
    factors = (1.0, 0.75, 0.75, 4.5, 0.0, 0.5, 2.5, 2.5)
    opt = _talr(lam=0.1, u0=0.1, u_max=0.16, schedule=_schedule(*factors))
    steps = [  # k_t, A_t, W_t, U_{t+1}
        (0.1, 0.5, 0.5, 0.15),
        (0.6, 2.25, 0.75, 0.075),
        (0.0, 1.125, 0.875, 0.15),
        (0.15, 1.0625, 0.9375, 0.0),
        (0.3, 1.0625, 0.9375, 0.1 * 15 / 17),
        (0.01, 1.0625 / 2 + 0.5 * 0.01 / (0.1 * 15 / 17), 0.96875, 0.16),
    ]
    K = rbar = 0.0
    for t, (k, A, W, U) in enumerate(steps):
        opt.observe({GLOBAL: torch.tensor(k)})
        K, rbar = 0.5 * K + 0.5 * k, 0.5 * rbar + 0.5 * 0.2 * factors[t]
        assert float(opt.A[GLOBAL]) == pytest.approx(A, rel=1e-6), t
        assert float(opt.W[GLOBAL]) == pytest.approx(W), t
        assert float(opt.U[GLOBAL]) == pytest.approx(U, rel=1e-6), t
        assert float(opt.K[GLOBAL]) == pytest.approx(K, rel=1e-6), t
        assert opt.R[GLOBAL] == pytest.approx(0.2 * factors[t]), t
    assert opt.metrics() == pytest.approx(
        {"talr_k": 0.01, "talr_K": K, "talr_R": 0.1, "talr_Rbar": rbar, "talr_U": 0.16}
    )
    assert opt.U[GLOBAL].dtype == torch.float64


def test_talr_tracking_without_any_measured_gain():
    # no transition ever: a = 0, U grows by c from U > 0 (0.1 -> 0.2), a zero target sets
    # U = 0, and from U = 0 it restarts at U_0 = 0.1 (upper bound u_max = 30 x 0.1)
    opt = _talr(lam=0.1, schedule=_schedule(1.0, 1.0, 0.0, 1.0, 1.0))
    assert opt.u_max == pytest.approx(3.0) and opt.u_start == pytest.approx(0.1)
    for U, W in ((0.2, 0.5), (0.0, 0.75), (0.1, 0.75)):
        opt.observe({GLOBAL: 0.0})
        assert float(opt.U[GLOBAL]) == pytest.approx(U)
        assert float(opt.W[GLOBAL]) == pytest.approx(W)
        assert float(opt.A[GLOBAL]) == 0.0
    assert _talr(u0=0.2).u_max == pytest.approx(6.0)  # 30 x max(U_0, LR)
    assert _talr(u0=0.05).u_max == pytest.approx(3.0)
    # a gain below 1: k 0.05 at U 0.1: a = 0.5, R_1 = 0.075 -> U_1 = 0.15 (inside [0.05, 0.2])
    opt = _talr(lam=0.1, schedule=_schedule(1.0, 0.375, 1.0))
    opt.observe({GLOBAL: 0.05})
    assert float(opt.U[GLOBAL]) == pytest.approx(0.15)
    # no gain yet at U_0 = 4 (> 1): U grows to c U = 8
    opt = _talr(lam=0.1, u0=4.0, u_max=100.0, schedule=_schedule(1.0, 1.0))
    opt.observe({GLOBAL: 0.0})
    assert float(opt.U[GLOBAL]) == pytest.approx(8.0)
    # from U = 0 with a known gain, the upper bound is u_max, not c * 0
    opt = _talr(lam=0.1, u0=0.1, u_max=0.5, schedule=_schedule(1.0, 0.0, 5.0, 1.0))
    opt.observe({GLOBAL: 0.1})  # a = 1, R_1 = 0 -> U = 0
    opt.observe({GLOBAL: 0.0})  # U = 0: R_2 / a = 1.0 -> u_max 0.5
    assert float(opt.U[GLOBAL]) == pytest.approx(0.5)


def test_talr_step_scales_the_latent_move_by_u_over_lr():
    # L = q(w).x, x = [1, 2]: dL/dw = [1, 2]; SGD at lr_ref 0.1 moves w by -[0.1, 0.2], TALR
    # scales the move by U_0 / lr_ref = 0.05 / 0.1: w = [0.52, 1.2] -> [0.47, 1.1], integers
    # [1, 1] -> [0, 1]: k_0 = 1/2. Tracking (m 0.5): a = 0.5 / 0.05 = 10, R_0 = 0.6 * 2,
    # R_1 = 1.2 (1 + cos(pi/2)) / 2 = 0.6 -> U_1 = 0.06 (inside [0.025, 0.1])
    layer = _layer([0.52, 1.2])
    opt = _talr(layer, lam=0.6, u0=0.05, total_steps=2)
    assert opt.lr_ref == pytest.approx(0.1)

    def closure():
        opt.zero_grad()
        loss = layer(_X).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert layer.weight[0].tolist() == pytest.approx([0.47, 1.1], rel=1e-6)
    assert float(opt.k[GLOBAL]) == pytest.approx(0.5)
    assert float(opt.U[GLOBAL]) == pytest.approx(0.06)
    # the count is keyed by the step: another user of the counter at step 0 sees the same moves
    assert opt.counter.update(layer, 0).rate() == pytest.approx(0.5)
    # the loop's LR (a scheduler set it to 0.3) is kept and does not change the move: U_1 x g
    opt.groups[0]["lr"] = 0.3
    opt.step(closure)
    assert opt.groups[0]["lr"] == 0.3
    assert layer.weight[0].tolist() == pytest.approx([0.47 - 0.06, 1.1 - 0.12], rel=1e-6)
    assert float(opt.k[GLOBAL]) == 0.0 and opt.t == 2


def test_talr_per_layer_rates_and_targets():
    # two 4-bit layers w0 = [0.52, 1.2], w1 = [1]: out = q(w1) q(w0).x; dL/dw0 = x, dL/dw1 = 3.
    # moves x 0.5: w0 -> [0.47, 1.1] (one of two integers moves: k = 0.5), w1 -> 0.85 (none)
    model = _quantized(nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False)))
    _fill(model[0].weight, [0.52, 1.2])
    _fill(model[1].weight, [1.0])
    for m in model:
        _fill(m.weight_quantizer.step, 1.0)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = TALR(base, model, 2, lam=0.6, u0=0.05, momentum=0.5, per_layer=True)
    assert [g["talr"] for g in opt.groups] == ["0", "1"]
    assert opt.R0 == pytest.approx({"0": 1.2, "1": 1.2})
    opt.zero_grad()
    model(_X).sum().backward()
    opt.step()
    assert model[0].weight[0].tolist() == pytest.approx([0.47, 1.1], rel=1e-6)
    assert model[1].weight.item() == pytest.approx(0.85)
    # layer 0: a = 10 -> U = 0.6 / 10; layer 1: no gain yet -> U = c U_0 = 0.1
    assert opt.metrics() == pytest.approx({
        "talr_k": 0.25, "talr_K": 0.125, "talr_R": 1.2, "talr_Rbar": 0.6, "talr_U": 0.08,
        "talr_U/0": 0.06, "talr_U/1": 0.1, "talr_K/0": 0.25, "talr_K/1": 0.0})  # fmt: skip


def test_talr_r0_of_mixed_bit_widths():
    # R_0 = lam sqrt(b); a global U over layers of 4 and 2 bits: numel-weighted mean
    model = _quantized(nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)))
    model[1].weight_quantizer.set_bits(2)
    opt = TALR(torch.optim.SGD(model.parameters(), lr=0.1), model, 8, lam=0.1)
    assert opt.R0 == pytest.approx({GLOBAL: 0.1 * (4 * 2 + 2 * math.sqrt(2)) / 6})
    assert opt.R == pytest.approx({GLOBAL: opt.R0[GLOBAL]})  # R of step 0 = R_0 (cosine)
    per = TALR(torch.optim.SGD(model.parameters(), lr=0.1), model, 8, lam=0.1, per_layer=True)
    assert per.R0 == pytest.approx({"0": 0.2, "1": 0.1 * math.sqrt(2)})


def test_talr_defaults_and_errors():
    opt = _talr(momentum=None, total_steps=1000)
    # the state before any step: float64 tensors, U_0 = the LR, nothing measured yet
    assert all(getattr(opt, n)[GLOBAL].dtype == torch.float64 for n in ("U", "K", "A", "W", "k"))
    assert float(opt.U[GLOBAL]) == 0.1 and opt.device == torch.device("cpu")
    assert opt.metrics() == {"talr_k": 0.0, "talr_K": 0.0, "talr_R": 0.01, "talr_Rbar": 0.0,
                             "talr_U": 0.1}  # fmt: skip
    assert (opt.m, opt.controller, opt.max_change, opt.per_layer) == (0.95, "tracking", 2.0, False)
    assert opt.lam == 5e-3 and opt.R0 == pytest.approx({GLOBAL: 0.01})  # SGD: 5e-3 x sqrt(4)
    assert opt.u_start == pytest.approx(0.1) and opt.eta == pytest.approx(0.1)
    assert (opt.milestones, opt.gamma, opt.schedule) == ((0.5, 0.75), 0.1, "cosine")
    assert opt.target(GLOBAL, 500) == pytest.approx(0.005)
    step = _talr(schedule="step", milestones=[0.25], gamma=0.5, lam=0.1)
    assert step.target(GLOBAL, 2) == pytest.approx(0.1)  # 0.2 x 0.5 from 2 / 8 on
    assert step.target(GLOBAL, 1) == pytest.approx(0.2)
    assert _talr(lr=0.0).lr_ref == 1.0  # an LR of 0 cannot be scaled from
    layer = _layer([0.3, 1.2])
    sgd = torch.optim.SGD([layer.weight], lr=0.1)
    sgd.param_groups[0]["initial_lr"] = 0.2  # set by a loop's scheduler: the initial LR wins
    scheduled = TALR(sgd, layer, 8)
    assert (scheduled.lr_ref, scheduled.u_start, scheduled.eta) == (0.2, 0.2, 0.2)
    pinned = _quantized(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), first_layer="8bit")
    sgd = torch.optim.SGD(pinned.parameters(), lr=0.1)
    assert TALR(sgd, pinned, 8).counter.layer_names == ["1"]
    sgd = torch.optim.SGD(pinned.parameters(), lr=0.1)
    assert TALR(sgd, pinned, 8, include_pinned=True).counter.layer_names == ["0", "1"]
    layer = _layer([0.3, 1.2])
    adam = TALR(torch.optim.Adam([layer.weight], lr=0.1), layer, 8)
    assert adam.lam == 2e-2
    assert layer.weight_quantizer.step.requires_grad is False  # frozen when wrapped
    assert default_lambda(torch.optim.Adam([nn.Parameter(torch.zeros(1))]), layer.weight) == 5e-3
    assert _talr(momentum=0.0).m == 0.0
    for bad in (dict(momentum=1.0), dict(momentum=-0.1), dict(max_change=1.0),
                dict(schedule="linear"), dict(controller="pid")):  # fmt: skip
        with pytest.raises(ValueError):
            _talr(**bad)
    _talr(max_change=1.01)
    with pytest.raises(ValueError):
        TALR(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), nn.Linear(1, 1), 8)


def test_talr_parameter_groups():
    layer = _quantized(nn.Linear(2, 1))
    w, b = layer.weight, layer.bias
    opt = torch.optim.SGD([{"params": [w, b], "momentum": 0.9, "weight_decay": 0.01}], lr=0.1)
    created = split_groups(opt, {GLOBAL: [w]})
    assert len(opt.param_groups) == 2 and created == [opt.param_groups[1]]
    assert opt.param_groups[0]["params"] == [b] and created[0]["params"] == [w]
    assert created[0]["talr"] == GLOBAL and "talr" not in opt.param_groups[0]
    hyper = (created[0]["lr"], created[0]["momentum"], created[0]["weight_decay"])
    assert hyper == (0.1, 0.9, 0.01)
    with pytest.raises(ValueError):  # TALR groups are skipped: w is no longer found
        split_groups(opt, {GLOBAL: [w]})
    stepped = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones_like(w)
    stepped.step()
    with pytest.raises(ValueError):
        split_groups(stepped, {GLOBAL: [w]})
    # a group with nothing of ours is left alone, an empty key makes no group
    two = torch.optim.SGD([{"params": [b]}, {"params": [w]}], lr=0.1)
    created = split_groups(two, {"x": [], GLOBAL: [w]})
    assert [g["params"] for g in two.param_groups] == [[b], [], [w]]
    assert [g.get("talr") for g in two.param_groups] == [None, None, GLOBAL]
    # a group added after the TALR groups is still searched
    extra = nn.Parameter(torch.zeros(1))
    two.add_param_group({"params": [extra]})
    assert split_groups(two, {"e": [extra]})[0]["params"] == [extra]
    assert freeze_weight_steps(layer, [""]) == [layer.weight_quantizer.step]
    assert layer.weight_quantizer.step.requires_grad is False


def test_talr_finds_the_torch_optimizers():
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    pair = type("Pair", (), {"optimizers": [sgd, adam]})()
    wrapped = type("Wrapped", (), {"base": pair})()
    assert torch_optimizers(sgd) == [sgd]
    assert torch_optimizers(pair) == [sgd, adam]
    assert torch_optimizers(wrapped) == [sgd, adam]
    with pytest.raises(TypeError):
        torch_optimizers(object())


def test_talr_state_round_trip():
    factors = (1.0, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
    opt = _talr(lam=0.1, schedule=_schedule(*factors))
    for k in (0.1, 0.3):
        opt.observe({GLOBAL: k})
    state = opt.wrapper_state()
    assert state["t"] == 2 and set(state) == {"t", "U", "K", "A", "W", "k", "R", "Rbar"}
    other = _talr(lam=0.1, schedule=_schedule(*factors))
    other.load_wrapper_state(state)
    other.load_wrapper_state({})  # nothing to load
    assert other.t == 2
    for name in ("U", "K", "A", "W", "k"):
        assert float(getattr(other, name)[GLOBAL]) == float(getattr(opt, name)[GLOBAL]), name
        assert getattr(other, name)[GLOBAL].dtype == torch.float64
    assert other.R == opt.R and other.Rbar == opt.Rbar
    opt.observe({GLOBAL: 0.2})
    other.observe({GLOBAL: 0.2})
    assert float(other.U[GLOBAL]) == float(opt.U[GLOBAL])
    # an older state without A, W, Rbar, with plain floats: those present are loaded in float64
    old = {
        "t": 5,
        "U": {GLOBAL: 0.25},
        "K": {GLOBAL: 0.125},
        "k": {GLOBAL: 0.5},
        "R": {GLOBAL: 0.1},
    }
    other.load_wrapper_state(old)
    assert (other.t, float(other.U[GLOBAL]), float(other.K[GLOBAL])) == (5, 0.25, 0.125)
    assert other.U[GLOBAL].dtype == torch.float64 and other.R[GLOBAL] == 0.1
    assert float(other.A[GLOBAL]) == float(opt.A[GLOBAL]) and other.Rbar == opt.Rbar
    state["U"] = {"0": torch.tensor(1.0)}
    with pytest.raises(ValueError):
        other.load_wrapper_state(state)


def test_talr_hook_logs_every_log_every_steps():
    layer = _layer([0.52, 1.2])
    hook = TALRHook(layer, 8, lam=0.1, momentum=0.5, log_every=3, u0=0.05, max_change=3.0,
                    u_max=0.2, controller="paper", eta=0.2, schedule="step",
                    milestones=(0.25,), gamma=0.5)  # fmt: skip
    assert hook.frozen == [layer.weight_quantizer.step]
    assert hook.after_step(layer, 2, 8) is None  # a logging step, but no optimizer yet
    opt = hook.wrap_optimizer(torch.optim.SGD([layer.weight], lr=0.1), layer)
    assert hook.optimizer is opt and opt.counter is hook.transitions
    assert (opt.lam, opt.m, opt.u_start, opt.max_change, opt.u_max) == (0.1, 0.5, 0.05, 3.0, 0.2)
    assert (opt.controller, opt.eta, opt.schedule, opt.milestones, opt.gamma) == (
        "paper", 0.2, "step", (0.25,), 0.5)  # fmt: skip
    assert opt.total_steps == 8
    assert hook.after_step(layer, 0, 8) is None and hook.after_step(layer, 1, 8) is None
    assert hook.after_step(layer, 2, 8) == opt.metrics()  # after every 3rd step
    assert hook.after_step(layer, 4, 8) is None
    assert TALRHook(_layer([0.3]), 8, log_every=0).after_step(layer, 1, 8) is None
    default = TALRHook(_layer([0.3]), 8)
    assert default.log_every == 50 and default.options == {
        "lam": None, "momentum": None, "schedule": "cosine", "per_layer": False,
        "controller": "tracking", "eta": None, "u0": None, "max_change": 2.0, "u_max": None,
        "milestones": (0.5, 0.75), "gamma": 0.1}  # fmt: skip
    pinned = _quantized(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), first_layer="8bit")
    assert TALRHook(pinned, 8).transitions.layer_names == ["1"]
    assert TALRHook(pinned, 8, include_pinned=True).transitions.layer_names == ["0", "1"]
    for bad in (dict(schedule="linear"), dict(controller="pid")):
        with pytest.raises(ValueError):
            TALRHook(_layer([0.3]), 8, **bad)


# ----------------------------------------------------------------------------- option checks
def test_saq_distributed_needs_two_ranks(monkeypatch):
    def fake(world: int, initialized: bool = True):
        return SimpleNamespace(
            is_available=lambda: True,
            is_initialized=lambda: initialized,
            get_world_size=lambda: world,
        )

    for world, expected in ((1, False), (2, True), (3, True)):
        monkeypatch.setattr(saq_module, "dist", fake(world))
        assert saq_module._distributed() is expected, world
    monkeypatch.setattr(saq_module, "dist", fake(2, initialized=False))
    assert saq_module._distributed() is False


def test_talr_and_oscreg_option_checks():
    from qatlab.errors import ConfigError
    from qatlab.methods.oscreg import REG_AGGREGATIONS
    from qatlab.methods.oscreg import _check as oscreg_check
    from qatlab.methods.talr import _check, _milestones

    ok = dict(lam=0.0, controller="tracking", momentum=0.0, schedule="cosine", eta=0.0, u0=0.0,
              max_change=1.0 + 1e-9, u_max=0.0, milestones="0.5, 0.75,", gamma=0.0)  # fmt: skip
    _check(**ok)  # the edges: every rate 0, momentum 0, max_change just above 1
    _check(**{**ok, "controller": "paper", "schedule": "step", "momentum": 0.999})
    _check(**{**ok, "schedule": "constant", "milestones": ""})
    bad = [("schedule", "linear"), ("controller", "pid"), ("lam", -1e-9), ("eta", -1.0),
           ("u0", -1.0), ("gamma", -1.0), ("u_max", -1.0), ("momentum", 1.0),
           ("momentum", -0.1), ("max_change", 1.0), ("milestones", "0.5;0.75")]  # fmt: skip
    for name, value in bad:
        with pytest.raises(ConfigError, match=rf"method\.{name} must"):  # names the option
            _check(**{**ok, name: value})
    assert _milestones("0.5, 0.75,") == (0.5, 0.75) and _milestones(" ") == ()
    assert _milestones("1") == (1.0,)
    for agg in REG_AGGREGATIONS:
        for grid in ("full", "restricted", "lsq"):
            oscreg_check(aggregation=agg, grid=grid)
    with pytest.raises(ConfigError):
        oscreg_check(aggregation="median", grid="full")
    with pytest.raises(ConfigError):
        oscreg_check(aggregation=REG_AGGREGATIONS[0], grid="int")
