"""The optimizer builders pinned on a hand-made model (``make mutants``, docs/results/mutation.md).

Which parameter lands in which group, at which LR, weight decay and optimizer, is written out
here for a model of one ``Linear(2, 1)``, an LSQ weight quantizer (role ``weight``) and an
LSQ+ input quantizer (step and offset, role ``input``); and what :class:`OptimizerPair`
exposes, on two one-parameter SGD optimizers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qatlab.errors import ConfigError
from qatlab.quant import Quantizer
from qatlab.train.config import TrainConfig
from qatlab.train.optim import (
    LogAdam,
    OptimizerPair,
    make_optimizer,
    optimizer,
    quantizer_parameters,
)


class _Net(nn.Module):
    """``Linear(2, 1)`` + LSQ weight step + LSQ+ input step and offset (5 parameter tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.wq = Quantizer(4, scale="lsq", role="weight")
        self.aq = Quantizer(4, scale="lsq+", role="input")


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def _groups(opt) -> list[tuple[str, list[int], float, float | None, bool | None]]:
    """(optimizer class, parameter ids, lr, weight decay, log flag) per group, in order."""
    opts = opt.optimizers if isinstance(opt, OptimizerPair) else (opt,)
    return [
        (type(o).__name__, _ids(g["params"]), g["lr"], g.get("weight_decay"), g.get("log"))
        for o in opts
        for g in o.param_groups
    ]


def test_quantizer_parameters_by_role():
    net = _Net()
    assert _ids(quantizer_parameters(net)) == _ids([net.wq.step, net.aq.step, net.aq.offset])
    assert _ids(quantizer_parameters(net, "weight")) == [id(net.wq.step)]
    assert _ids(quantizer_parameters(net, "input")) == _ids([net.aq.step, net.aq.offset])


def test_make_optimizer_three_optimizers_by_hand():
    net = _Net()
    w = _ids([net.fc.weight, net.fc.bias])
    cfg = TrainConfig(
        optimizer="sgd",
        lr=0.1,
        momentum=0.5,
        nesterov=True,
        weight_decay=0.01,
        quant_optimizer="adam",
        quant_lr="2x",
        act_quant_optimizer="logadam",
        act_quant_lr=0.003,
    )
    opt = make_optimizer(net, cfg)
    assert isinstance(opt, OptimizerPair)
    assert _groups(opt) == [
        ("SGD", w, 0.1, 0.01, None),
        ("Adam", [id(net.wq.step)], pytest.approx(0.2), 0.0, None),
        # LogAdam: the step on log s, the LSQ+ offset (may be negative) in a plain-Adam group
        ("LogAdam", [id(net.aq.step)], 0.003, None, True),
        ("LogAdam", [id(net.aq.offset)], 0.003, None, False),
    ]
    sgd = opt.optimizers[0]
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["nesterov"] is True
    assert sgd.defaults["lr"] == 0.1
    assert opt.optimizers[1].defaults["lr"] == 0.1  # group LRs override the constructor's
    assert opt.optimizers[2].defaults["lr"] == 0.1


def test_make_optimizer_none_means_as_the_weights_and_as_the_weight_steps():
    net = _Net()
    w = _ids([net.fc.weight, net.fc.bias])
    cfg = TrainConfig(
        optimizer="adamw",
        lr=0.02,
        weight_decay=0.5,
        quant_optimizer=None,
        quant_lr=None,
        act_quant_optimizer=None,
        act_quant_lr=None,
    )
    opt = make_optimizer(net, cfg)  # one optimizer: every group is AdamW's
    assert isinstance(opt, torch.optim.AdamW)
    assert _groups(opt) == [
        ("AdamW", w, 0.02, 0.5, None),
        ("AdamW", [id(net.wq.step)], 0.02, 0.0, None),
        ("AdamW", _ids([net.aq.step, net.aq.offset]), 0.02, 0.0, None),
    ]
    # activation steps as the weight steps (optimizer and LR), which differ from the weights'
    cfg = TrainConfig(
        optimizer="sgd", lr=0.1, quant_optimizer="adam", quant_lr=0.004,
        act_quant_optimizer=None, act_quant_lr=None,
    )  # fmt: skip
    assert _groups(make_optimizer(net, cfg)) == [
        ("SGD", w, 0.1, 0.0, None),
        ("Adam", [id(net.wq.step)], 0.004, 0.0, None),
        ("Adam", _ids([net.aq.step, net.aq.offset]), 0.004, 0.0, None),
    ]


def test_make_optimizer_logadam_weight_steps_and_auto():
    net = _Net()
    w = _ids([net.fc.weight, net.fc.bias])
    cfg = TrainConfig(optimizer="adam", lr=0.01)  # "auto" everywhere: the from-scratch recipe
    opt = make_optimizer(net, cfg)
    assert cfg.quant_optimizer == "auto" and cfg.act_quant_lr == "auto"  # caller's cfg kept
    assert _groups(opt) == [
        ("Adam", w, 0.01, 0.0, None),
        ("Adam", _ids([net.aq.step, net.aq.offset]), 1e-5, 0.0, None),
        ("LogAdam", [id(net.wq.step)], 5e-3, None, True),
    ]
    assert isinstance(opt.optimizers[1], LogAdam)
    # only one "auto" field is enough to resolve the recipe
    for field in ("quant_optimizer", "quant_lr", "act_quant_optimizer", "act_quant_lr"):
        kw = dict(quant_optimizer="sgd", quant_lr=0.3, act_quant_optimizer="sgd", act_quant_lr=0.3)
        kw[field] = "auto"
        groups = _groups(make_optimizer(net, TrainConfig(optimizer="sgd", lr=0.1, **kw)))
        assert len(groups) == 3, field  # no "auto" string left as an LR or optimizer name
        assert all(isinstance(g[2], float) for g in groups), field


def test_make_optimizer_frozen_parameters_and_empty_groups():
    net = _Net()
    net.fc.bias.requires_grad_(False)
    net.aq.offset.requires_grad_(False)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, quant_optimizer="logadam", quant_lr=0.1,
                      act_quant_optimizer="logadam", act_quant_lr=0.2)  # fmt: skip
    assert _groups(make_optimizer(net, cfg)) == [
        ("SGD", [id(net.fc.weight)], 0.1, 0.0, None),
        ("LogAdam", [id(net.wq.step)], 0.1, None, True),
        ("LogAdam", [id(net.aq.step)], 0.2, None, True),
    ]
    # a model without quantizers: one SGD, its empty step groups dropped
    lin = nn.Linear(2, 1)
    opt = make_optimizer(lin, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert _groups(opt) == [("SGD", _ids(lin.parameters()), 0.1, 0.0, None)]
    # weights frozen, steps trained with the weights' optimizer: the empty weight group goes
    net = _Net()
    net.fc.requires_grad_(False)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, quant_optimizer=None, quant_lr=0.5,
                      act_quant_optimizer=None, act_quant_lr=0.25)  # fmt: skip
    assert _groups(make_optimizer(net, cfg)) == [
        ("SGD", [id(net.wq.step)], 0.5, 0.0, None),
        ("SGD", _ids([net.aq.step, net.aq.offset]), 0.25, 0.0, None),
    ]
    with pytest.raises(ConfigError):
        make_optimizer(nn.Linear(2, 1).requires_grad_(False), cfg)


def test_make_optimizer_activation_steps_without_weight_steps():
    # no weight quantizer: the empty weight-step group is skipped, the activation steps stay
    net = _Net()
    del net.wq
    cfg = TrainConfig(optimizer="sgd", lr=0.1, quant_optimizer="adam", quant_lr=0.01,
                      act_quant_optimizer="adamw", act_quant_lr=0.02)  # fmt: skip
    assert _groups(make_optimizer(net, cfg)) == [
        ("SGD", _ids([net.fc.weight, net.fc.bias]), 0.1, 0.0, None),
        ("AdamW", _ids([net.aq.step, net.aq.offset]), 0.02, 0.0, None),
    ]


def test_sgd_nesterov_needs_momentum():
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError):
        make_optimizer(nn.Linear(2, 1), cfg)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, nesterov=False)
    assert make_optimizer(nn.Linear(2, 1), cfg).defaults["momentum"] == 0.0


def test_optimizer_facade_defaults_and_initial_lr():
    net = _Net()
    w = _ids([net.fc.weight, net.fc.bias])
    opt = optimizer(net)  # adam 1e-3; from scratch: LogAdam 5e-3 weight steps, Adam 1e-5 acts
    assert _groups(opt) == [
        ("Adam", w, 1e-3, 0.0, None),
        ("Adam", _ids([net.aq.step, net.aq.offset]), 1e-5, 0.0, None),
        ("LogAdam", [id(net.wq.step)], 5e-3, None, True),
    ]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 1e-5, 5e-3]
    opt = optimizer(net, fine_tune=True)  # every step Adam at 1e-5: one Adam
    assert isinstance(opt, torch.optim.Adam)
    assert _groups(opt) == [
        ("Adam", w, 1e-3, 0.0, None),
        ("Adam", [id(net.wq.step)], 1e-5, 0.0, None),
        ("Adam", _ids([net.aq.step, net.aq.offset]), 1e-5, 0.0, None),
    ]
    opt = optimizer(net, "sgd", 0.1)  # momentum 0.9, no nesterov, no weight decay by default
    sgd = opt.optimizers[0]
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is False
    assert sgd.param_groups[0]["weight_decay"] == 0.0
    opt = optimizer(net, "sgd", 0.1, momentum=0.3, nesterov=True, weight_decay=0.2,
                    quant_optimizer="sgd", quant_lr="0.5x", act_quant_optimizer="sgd",
                    act_quant_lr=0.7)  # fmt: skip
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.3 and opt.defaults["nesterov"] is True
    assert _groups(opt) == [
        ("SGD", w, 0.1, 0.2, None),
        ("SGD", [id(net.wq.step)], 0.05, 0.0, None),
        ("SGD", _ids([net.aq.step, net.aq.offset]), 0.7, 0.0, None),
    ]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.05, 0.7]
    with pytest.raises(ConfigError):
        optimizer("not a model")


def test_optimizer_pair_by_hand():
    a, b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0))
    sa, sb = torch.optim.SGD([a], lr=0.5), torch.optim.SGD([b], lr=0.25, momentum=0.5)
    pair = OptimizerPair(sa, sb)
    assert [g["lr"] for g in pair.param_groups] == [0.5, 0.25]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        pair.zero_grad()
        loss = 3 * a + 4 * b
        loss.backward()
        return loss

    with torch.no_grad():
        loss = pair.step(closure)
    assert calls == [True] and float(loss.detach()) == 11.0
    assert float(a.detach()) == 1.0 - 0.5 * 3 and float(b.detach()) == 2.0 - 0.25 * 4
    assert list(pair.state) == [b] and float(pair.state[b]["momentum_buffer"]) == 4.0
    assert pair.step() is None  # no closure: the grads kept, each optimizer stepped once more
    assert float(a.detach()) == -0.5 - 1.5 and float(b.detach()) == 1.0 - 0.25 * (0.5 * 4 + 4)
    state = pair.state_dict()
    assert list(state) == ["pair"] and len(state["pair"]) == 2
    pair.zero_grad(set_to_none=False)
    assert float(a.grad) == 0.0 and float(b.grad) == 0.0
    pair.zero_grad()
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError):  # a state of another number of optimizers
        OptimizerPair(torch.optim.SGD([a], lr=0.5)).load_state_dict(state)
    fresh = OptimizerPair(torch.optim.SGD([a], lr=0.5), torch.optim.SGD([b], lr=0.1, momentum=0.5))
    fresh.load_state_dict(state)
    assert fresh.param_groups[1]["lr"] == 0.25
    assert float(fresh.state[b]["momentum_buffer"]) == 6.0
