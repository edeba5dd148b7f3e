"""SAQ (Liu et al.): rho=0 is plain QAT, case 3 perturbs q(w) from dL/dq(w), case 2's diminishing
effect, exact restoration, BN statistics once per step, state round trip, registry and CLI."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatlab
from qatlab import models
from qatlab.errors import ConfigError
from qatlab.methods import build_hooks, check_options
from qatlab.methods.saq import SAQ
from qatlab.methods.saq import _saq as saq_builder
from qatlab.quant.layers import QuantLayer, quant_layers

SHAPE = (1, 40)


def _model(bits: int = 3, seed: int = 0, pinned: str = "8bit") -> nn.Module:
    """A small quantized cnn1d (first/last layer at 8 bits unless ``pinned="same"``)."""
    torch.manual_seed(seed)
    model = models.create("cnn1d", 10, SHAPE, width=8)
    cfg = qatlab.QuantConfig(weight_bits=bits, act_bits=bits, first_layer=pinned, last_layer=pinned)
    model = qatlab.quantize(model, cfg)
    qatlab.calibrate(model, [torch.randn(32, *SHAPE)])
    return model.train()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, *SHAPE, generator=g), torch.randint(0, 10, (32,), generator=g))
        for _ in range(n)
    ]


def _closure(model, opt, x, y, calls: list | None = None, fail_at: int | None = None):
    def closure(sync: bool = True):
        if calls is not None:
            calls.append(sync)
            if fail_at is not None and len(calls) == fail_at:
                raise RuntimeError("boom")
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- rho = 0
VARIANTS = [
    {"case": 1},
    {"case": 2},
    {"case": 3},
    {"case": 2, "every": 4},
    {"case": 3, "every": 3},
    {"case": 3, "adaptive": True},
    {"case": 1, "adaptive": True, "adaptive_bias": False, "bias": True, "norm": True},
    {"case": 3, "ball": "std"},
    {"case": 3, "ball": "authors", "adaptive": True},
    {"case": 3, "ball": "std", "weight_steps": True, "act_steps": True},
    {"case": 2, "ball": "std", "weight_steps": True, "norm": True, "bn_update": True},
]


def _variant_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", VARIANTS, ids=_variant_id)
def test_rho_zero_step_is_exactly_plain_qat(options):
    plain = _model(pinned="same")  # every layer has learned weight and input steps
    saq_model = copy.deepcopy(plain)
    opt_plain = _sgd(plain)
    opt = SAQ(_sgd(saq_model), saq_model, rho=0.0, **options)
    for x, y in _batches(3):
        calls: list = []
        opt.step(_closure(saq_model, opt, x, y, calls))
        assert len(calls) == 1
        opt_plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()
    assert _same(_snapshot(plain), _snapshot(saq_model))


# ----------------------------------------------------------------------------- case 3
def _grad_wrt_qweights(model, x, y) -> dict[str, torch.Tensor]:
    """dL/dq(w) computed independently: each layer's forward uses a leaf copy of sg[q(w)]."""
    model = copy.deepcopy(model)
    leaves = {}
    for name, m in quant_layers(model):
        leaves[name] = m.weight_quantizer.quantize_detached(m.weight).requires_grad_()
        m.quantized_weight = lambda leaf=leaves[name]: leaf  # instance attribute shadows
    F.cross_entropy(model(x), y).backward()
    return {n: w.grad for n, w in leaves.items()}


def test_case3_perturbation_has_norm_rho_from_quantized_grad_and_moves_only_qw():
    model, rho = _model(bits=2), 0.2
    opt = SAQ(_sgd(model), model, rho=rho, case=3, ball="raw")
    ((x, y),) = _batches(1)
    reference = _grad_wrt_qweights(model, x, y)
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    latent = {n: m.weight.grad.clone() for n, m in quant_layers(model)}
    before = _snapshot(model)
    e = opt.first_step(zero_grad=True)

    assert set(e) == set(reference) == {n for n, _ in quant_layers(model)}
    norm = torch.sqrt(sum((v**2).sum() for v in e.values()))
    assert norm.item() == pytest.approx(rho, rel=1e-5)
    total = torch.sqrt(sum((g**2).sum() for g in reference.values()))
    for name, g in reference.items():
        torch.testing.assert_close(e[name], rho * g / total, rtol=1e-5, atol=1e-8)
    # dL/dq(w) is not the STE latent gradient (it is non-zero where weights are clipped)
    lat_total = torch.sqrt(sum((g**2).sum() for g in latent.values()))
    differs = [not torch.allclose(e[n], rho * latent[n] / lat_total, atol=1e-6) for n in e]
    assert any(differs)

    # the perturbed forward uses q(w) + e; latent weights, step sizes and BN stats untouched
    layers = dict(quant_layers(model))
    for name, m in layers.items():
        qw = m.weight_quantizer.quantize_detached(m.weight)
        torch.testing.assert_close(m.quantized_weight().detach(), qw + e[name], rtol=0, atol=1e-7)
    F.cross_entropy(model(x), y).backward()
    assert _same(before, _snapshot(model))
    opt.second_step(zero_grad=True)
    assert all(isinstance(m, QuantLayer) and m.qweight_delta is None for m in layers.values())


def test_case1_uses_latent_gradient_and_adaptive_ball_has_rho_in_T_metric():
    model = _model()
    ((x, y),) = _batches(1)
    opt = SAQ(_sgd(model), model, rho=0.1, case=1, ball="raw")
    F.cross_entropy(model(x), y).backward()
    latent = {n: m.weight.grad for n, m in quant_layers(model)}
    e = opt.perturbation()
    total = torch.sqrt(sum((g**2).sum() for g in latent.values()))
    for n, g in latent.items():
        torch.testing.assert_close(e[n], 0.1 * g / total, rtol=1e-5, atol=1e-9)

    opt = SAQ(_sgd(model), model, rho=0.1, case=3, adaptive=True, eta=0.01, ball="raw")
    model.zero_grad()
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    kept = opt._kept.tensors()
    e = opt.perturbation()
    t_norm = torch.sqrt(sum(((v / (kept[n].abs() + 0.01)) ** 2).sum() for n, v in e.items()))
    assert t_norm.item() == pytest.approx(0.1, rel=1e-5)


# ----------------------------------------------------------------------------- case 2
def test_case2_small_rho_barely_changes_the_integers():
    """Plain SAM on latent weights: rounding swallows most of a small perturbation."""
    model, rho = _model(bits=3, pinned="same"), 0.05  # every layer at 3 bits
    ((x, y),) = _batches(1)
    opt = SAQ(_sgd(model), model, rho=rho, case=2, ball="raw")
    ints = {n: m.weight_int().clone() for n, m in quant_layers(model)}
    before = _snapshot(model)
    F.cross_entropy(model(x), y).backward()
    e = opt.first_step()
    changed = sum(int((m.weight_int() != ints[n]).sum()) for n, m in quant_layers(model))
    count = sum(v.numel() for v in ints.values())
    share = changed / count
    moved = torch.sqrt(sum((v**2).sum() for v in e.values()))
    assert moved.item() == pytest.approx(rho, rel=1e-5)
    assert share < 0.03, share  # the "diminishing" effect
    # while the same ball in case 3 moves every weight with a gradient (none is swallowed)
    model.zero_grad()
    opt3 = SAQ(_sgd(model), model, rho=rho, case=3, ball="raw")
    opt.restore()
    with opt3.first_pass():
        F.cross_entropy(model(x), y).backward()
    e3 = opt3.first_step()
    moved3 = sum(int((v != 0).sum()) for v in e3.values()) / count
    assert moved3 > 0.5
    opt3.restore()
    opt.restore()
    params = {n for n, _ in model.named_parameters()}
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in params)  # restored bit for bit


# ----------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("case", [1, 2, 3])
def test_restoration_is_exact_after_an_exception_in_the_second_pass(case):
    model = _model()
    opt = SAQ(_sgd(model), model, rho=0.5, case=case, bias=True, norm=True, act_steps=True)
    assert any(k.endswith(".step") for k in opt.extras)  # activation steps joined the ball
    assert any(k.endswith(".bias") for k in opt.extras)
    ((x, y),) = _batches(1)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(_closure(model, opt, x, y, [], fail_at=2))
    after = _snapshot(model)
    # pass 1 updated BN running stats once (its normal forward); every parameter is untouched
    params = {n for n, _ in model.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)
    layers = [m for _, m in quant_layers(model)]
    assert all(m.qweight_delta is None for m in layers)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    opt.step(_closure(model, opt, x, y))  # and the wrapper still works
    assert not _same(after, _snapshot(model))


# ----------------------------------------------------------------------------- BN statistics
@pytest.mark.parametrize("bn_update,every,expected", [(False, 1, 1), (True, 1, 2), (False, 2, 1)])
def test_bn_running_stats_change_once_per_step(bn_update, every, expected):
    model = _model()
    opt = SAQ(_sgd(model), model, rho=0.3, bn_update=bn_update, every=every)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for i, (x, y) in enumerate(_batches(3)):
        counts = [int(m.num_batches_tracked) for m in bns]
        ref = copy.deepcopy(model)
        opt.step(_closure(model, opt, x, y))
        fresh = every == 1 or i % every == 0
        n = expected if fresh else 1
        assert [int(m.num_batches_tracked) for m in bns] == [c + n for c in counts]
        if not bn_update and fresh:  # exactly the statistics of the first (unperturbed) pass
            ref(x)
            ref_bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm1d)]
            for a, b in zip(bns, ref_bns, strict=True):
                assert torch.equal(a.running_mean, b.running_mean)
                assert torch.equal(a.running_var, b.running_var)


# ----------------------------------------------------------------------------- efficient variant
def test_efficient_variant_one_pass_between_fresh_steps_and_reuses_e():
    model = _model()
    opt = SAQ(_sgd(model), model, rho=0.3, every=3, ball="raw")
    passes = []
    for x, y in _batches(7):
        calls: list = []
        opt.step(_closure(model, opt, x, y, calls))
        passes.append(len(calls))
        if len(calls) == 2:
            fresh_e = {k: v.clone() for k, v in opt.last_e.items()}
        else:
            assert _same(fresh_e, opt.last_e)
    assert passes == [2, 1, 1, 2, 1, 1, 2]
    norm = torch.sqrt(sum((v**2).sum() for v in opt.last_e.values()))
    assert norm.item() == pytest.approx(0.3, rel=1e-5)


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("case", [2, 3])
def test_state_dict_round_trip_reproduces_the_following_steps(case):
    """4 steps, save, 3 more; a fresh model + wrapper loaded from the save repeats those 3."""
    model = _model()
    opt = SAQ(_sgd(model), model, rho=0.3, case=case, every=3)
    batches = _batches(7)
    for x, y in batches[:4]:
        opt.step(_closure(model, opt, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["wrapper"]["steps"] == 4 and saved_opt["wrapper"]["last_e"]
    for x, y in batches[4:]:
        opt.step(_closure(model, opt, x, y))

    other = _model(seed=5)
    other.load_state_dict(saved_model)
    opt2 = SAQ(_sgd(other), other, rho=0.3, case=case, every=3)
    opt2.load_state_dict(saved_opt)
    for x, y in batches[4:]:
        opt2.step(_closure(other, opt2, x, y))
    assert _same(_snapshot(model), _snapshot(other))


# ----------------------------------------------------------------------------- registry + CLI
def test_registry_options_and_errors():
    opts = check_options("saq", {"rho": 0.1, "case": 1, "every": 4})
    assert opts["rho"] == 0.1 and opts["case"] == 1 and opts["every"] == 4
    model = _model()
    (hook,) = build_hooks("saq", {"rho": 0.2, "case": 2}, model, qatlab.QuantConfig(), 10)
    opt = hook.wrap_optimizer(_sgd(model), model)
    assert isinstance(opt, SAQ) and opt.case == 2 and opt.rho == 0.2
    opts = check_options("saq", {"ball": "std", "weight_steps": True, "adaptive_bias": False})
    assert opts["ball"] == "std" and opts["weight_steps"] and not opts["adaptive_bias"]
    bads = [({"case": 4}, "case"), ({"rho": -1.0}, "rho"), ({"every": 0}, "every")]
    for bad, msg in [*bads, ({"ball": "unit"}, "ball must be one of raw, std, authors")]:
        with pytest.raises(ConfigError, match=msg):
            build_hooks("saq", bad, model, qatlab.QuantConfig(), 10)
    with pytest.raises(ConfigError, match="wbits"):
        build_hooks("saq", {}, model, None, 10)


def test_cli_trains_with_saq(tiny_data_config, tmp_path, capsys):
    from qatlab.cli import main

    argv = [
        "train",
        "--dataset",
        "mnist1d",
        "--model",
        "mlp5",
        "--wbits",
        "3",
        "--abits",
        "3",
        "--method",
        "saq",
        "--rho",
        "0.1",
        "--set",
        "method.case=3",
        "--set",
        "method.every=2",
        "--epochs",
        "4",
        "--lr",
        "5e-3",
        "--batch-size",
        "64",
        "--out-dir",
        str(tmp_path),
        "--name",
        "s",
    ]
    for key, value in tiny_data_config.items():
        argv += ["--set", f"data.{key}={value}"]
    main(argv)
    import json

    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    # every option of the builder's signature with its default, but the three given
    params = list(inspect.signature(saq_builder).parameters.values())[3:]
    expected = {"name": "saq", **{p.name: p.default for p in params}}
    expected.update(rho=0.1, case=3, every=2)
    assert summary["config"]["method"] == expected
    # it learned: 4 epochs reach 0.26 (seed 0) and 0.30 (seed 1) where chance is 0.10 (a
    # bound 4.7 standard errors of chance above it on the 300 test samples, 0.08 below seed 0)
    assert summary["test_acc"] > 0.18


def test_kill_and_resume_in_the_trainer_is_exact_mid_cycle(tiny_data_config, tmp_path):
    """16 steps per epoch, every=3: the resumed epoch starts on a reused-e step, so the saved
    e_last (wrapper state in the checkpointed optimizer) decides the result."""
    from qatlab.methods.base import Hook
    from qatlab.train import RunConfig, fit
    from qatlab.train.runner import build

    class Killer(Hook):
        def after_step(self, model, step, total_steps):
            if step + 1 == 20 and self.armed:
                raise KeyboardInterrupt

    raw = {
        "data": tiny_data_config,
        "model": {"name": "mlp5", "width": 32},
        "quant": {"weight_bits": 3, "act_bits": 3},
        "method": {"name": "saq", "rho": 0.2, "every": 3},
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "progress": False},
    }

    def go(name: str, armed: bool, resume: bool = False):
        cfg = RunConfig.from_dict({**raw, "name": name, "out_dir": str(tmp_path)})
        model, data, hooks = build(cfg, resume=resume)
        killer = Killer()
        killer.armed = armed
        fit(
            model,
            data,
            cfg.train,
            hooks=[*hooks, killer],
            run_dir=cfg.run_dir,
            resume=resume,
            run_config=cfg,
        )
        return model, hooks[0]

    whole, hook = go("whole", False)
    assert hook.optimizer.steps == 32 and hook.optimizer.last_e is not None
    with pytest.raises(KeyboardInterrupt):
        go("cut", True)
    resumed, hook2 = go("cut", False, resume=True)
    assert hook2.optimizer.steps == 32
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


@pytest.mark.parametrize(
    "case,per_replica,extras,first_sync,reduces",
    [
        (3, False, False, False, True),  # exact: no DDP sync in pass 1, one all-reduce of dL/dq
        (3, False, True, True, True),  # extras need the synced parameter gradients too
        (2, False, False, True, False),  # latent gradients: DDP's own sync is exact
        (3, True, False, False, False),  # per replica: no communication at all
        (1, True, False, False, False),
    ],
)
def test_ddp_first_pass_sync_and_exact_reduction(
    monkeypatch, case, per_replica, extras, first_sync, reduces
):
    """Two identical replicas simulated: all_reduce doubles, so the exact e equals the local."""
    import qatlab.methods.saq as saq_mod

    reduced = []

    def fake_all_reduce(t):
        reduced.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(saq_mod, "_distributed", lambda: True)
    monkeypatch.setattr(saq_mod.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(saq_mod.dist, "get_world_size", lambda: 2)
    model = _model()
    reference = copy.deepcopy(model)
    ((x, y),) = _batches(1)
    opt = SAQ(_sgd(model), model, rho=0.3, case=case, per_replica=per_replica, bias=extras)
    ref = SAQ(_sgd(reference), reference, rho=0.3, case=case, bias=extras)
    calls: list = []
    opt.step(_closure(model, opt, x, y, calls))
    assert calls == [first_sync, True]
    assert bool(reduced) == reduces
    if reduces:
        assert reduced == [sum(m.weight.numel() for _, m in quant_layers(model))]
    monkeypatch.setattr(saq_mod, "_distributed", lambda: False)
    ref.step(_closure(reference, ref, x, y))
    assert _same(_snapshot(model), _snapshot(reference))


# ----------------------------------------------------------------------------- the authors' ball
# The few functions below are copied (trimmed, as functions instead of layer classes) from the
# SAQ authors' code, https://github.com/zhuang-group/SAQ (quan_models/common.py: quantization,
# RoundFunction; quan_models/LIQ.py: normalization_on_weights, quantize_activation,
# quantize_weight; models/LIQ_wn_qsam.py: QConv2d/QLinear.forward with the weight
# standardization and ``x + epsilon``; utils/qsam.py: QSAM._grad_norm and ascent_step).
# Copyright (c) the SAQ authors. Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this code except in compliance with the License. You may obtain a copy of the
# License at http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or
# agreed to in writing, software distributed under the License is distributed on an "AS IS"
# BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. Modified: the
# layers are written as one small module, the SAM state is a plain dict.
class _RoundFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n):
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def _quantization(x, k):
    return _RoundFunction.apply(x, 2**k - 1)


def _quantize_activation(x, k, clip_value):
    x = torch.clamp(x / clip_value, min=0, max=1)
    return _quantization(x, k) * clip_value


def _quantize_weight(x, k, clip_value):
    x = torch.clamp(x / clip_value, min=-1, max=1)
    x = (x + 1.0) / 2.0
    x = _quantization(x, k)
    x = x * 2.0 - 1.0
    return x * clip_value


class _TheirNet(nn.Module):
    """QConv2d (LIQ_wn_qsam: standardized weight) + BN + ReLU + pool + QLinear (raw weight)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, fc: nn.Linear, clips: dict, k: int):
        super().__init__()
        self.conv, self.bn, self.fc, self.k = conv, bn, fc, k
        self.wclip_c = nn.Parameter(torch.tensor([clips["wc"]]))
        self.aclip_c = nn.Parameter(torch.tensor([clips["ac"]]))
        self.wclip_f = nn.Parameter(torch.tensor([clips["wf"]]))
        self.aclip_f = nn.Parameter(torch.tensor([clips["af"]]))
        self.eps_c = self.eps_f = None  # epsilon of the second forward

    def forward(self, x):
        x = _quantize_activation(x, self.k, self.aclip_c.abs())
        w = self.conv.weight
        normalized = w.add(-w.data.mean()).div(w.data.std())
        self.xc = _quantize_weight(normalized, self.k, self.wclip_c.abs())
        self.xc.retain_grad()
        wc = self.xc if self.eps_c is None else self.xc + self.eps_c
        h = torch.relu(self.bn(F.conv2d(x, wc, None, 1, 1)))
        h = _quantize_activation(h.mean((2, 3)), self.k, self.aclip_f.abs())
        self.xf = _quantize_weight(self.fc.weight, self.k, self.wclip_f.abs())
        self.xf.retain_grad()
        wf = self.xf if self.eps_f is None else self.xf + self.eps_f
        return F.linear(h, wf, self.fc.bias)

    @torch.no_grad()
    def ascent_step(self, rho):
        """QSAM with include_wclip, include_aclip (their default, on), include_bn; returns the
        in-place perturbations by name."""
        inplace = {
            "wclip_c": self.wclip_c, "aclip_c": self.aclip_c, "wclip_f": self.wclip_f,
            "aclip_f": self.aclip_f, "fc.bias": self.fc.bias, "bn.weight": self.bn.weight,
            "bn.bias": self.bn.bias,
        }
        grads = [self.xc.grad, self.xf.grad] + [p.grad for p in inplace.values()]
        norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2)
        scale = rho / (norm + 1e-12)
        self.eps_c, self.eps_f = self.xc.grad * scale, self.xf.grad * scale
        out = {"conv": self.eps_c, "fc": self.eps_f}
        for name, p in inplace.items():
            out[name] = p.grad * scale
            p.add_(out[name])
        return out
# ------------------------------------------------------------------- end of the authors' code


class _StdWeightQ(nn.Module):
    """The authors' conv weight quantizer carried to raw units: ``std * Q((w - mean) / std)``
    with the clip kept in raw units (``step = std * clip``)."""

    def __init__(self, clip: float, std: float, k: int) -> None:
        super().__init__()
        self.step, self.k = nn.Parameter(torch.tensor(clip * std)), k

    def forward(self, w):
        mean, std = w.detach().mean(), w.detach().std()
        return std * _quantize_weight((w - mean) / std, self.k, self.step.abs() / std)


class _RawQ(nn.Module):
    """The authors' raw weight / activation quantizer with the clip as ``step``."""

    def __init__(self, clip: float, k: int, weight: bool) -> None:
        super().__init__()
        self.step, self.k, self.weight = nn.Parameter(torch.tensor([clip])), k, weight

    def forward(self, x):
        fn = _quantize_weight if self.weight else _quantize_activation
        return fn(x, self.k, self.step.abs())


def test_authors_ball_is_the_authors_perturbation_on_identical_tensors():
    """conv + BN + linear at W4A4 with the authors' quantizers on both sides: qatlab's
    ``ball="authors"`` (+ bias, norm, act_steps, weight_steps) perturbs by exactly ``std`` times
    the authors' QSAM ``e`` on the conv weight and clip, by their ``e`` everywhere else, and the
    second-pass gradients of every parameter agree (to float rounding)."""
    k, rho, eps = 4, 0.3, 1e-5
    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=eps), (
        nn.Linear(16, 10)
    )
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    std = float(conv.weight.detach().std())
    clips = {"wc": 2.0, "ac": 0.8, "wf": float(fc.weight.detach().abs().max()) * 0.8, "af": 0.3}
    theirs = _TheirNet(*copy.deepcopy((conv, bn, fc)), clips, k).train()

    # qatlab: the same layers, quantized, with the authors' quantizers in raw units; BN's eps
    # scaled by std^2 so that BN(std * y) == BN(y) exactly in real arithmetic
    bn_q = copy.deepcopy(bn)
    bn_q.eps = eps * std**2
    float_net = nn.Sequential(
        copy.deepcopy(conv), bn_q, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        copy.deepcopy(fc),
    )
    cfg = qatlab.QuantConfig(weight_bits=k, act_bits=k, first_layer="same", last_layer="same")
    ours = qatlab.quantize(float_net, cfg).train()
    qconv, qfc = ours[0], ours[5]
    qconv.weight_quantizer = _StdWeightQ(clips["wc"], std, k)
    qconv.input_quantizer = _RawQ(clips["ac"], k, weight=False)
    qfc.weight_quantizer = _RawQ(clips["wf"], k, weight=True)
    qfc.input_quantizer = _RawQ(clips["af"], k, weight=False)
    opt = SAQ(
        torch.optim.SGD(ours.parameters(), lr=0.1), ours, rho=rho, ball="authors", bias=True,
        norm=True, act_steps=True, weight_steps=True,
    )

    x, y = torch.rand(8, 3, 6, 6) * 1.5, torch.randint(0, 10, (8,))
    F.cross_entropy(theirs(x), y).backward()
    e_theirs = theirs.ascent_step(rho)
    theirs.zero_grad()
    F.cross_entropy(theirs(x), y).backward()  # second pass at the perturbed point

    with opt.first_pass():
        F.cross_entropy(ours(x), y).backward()
    params = dict(ours.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    e = opt.first_step(zero_grad=True)
    F.cross_entropy(ours(x), y).backward()
    moved = {n: params[n].detach() - before[n] for n in params}

    close = dict(rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(e["0"] / std, e_theirs["conv"], **close)
    torch.testing.assert_close(e["5"], e_theirs["fc"], **close)
    pairs = {  # our parameter -> (theirs, our units / theirs)
        "0.weight_quantizer.step": ("wclip_c", std),
        "0.input_quantizer.step": ("aclip_c", 1.0),
        "5.weight_quantizer.step": ("wclip_f", 1.0),
        "5.input_quantizer.step": ("aclip_f", 1.0),
        "5.bias": ("fc.bias", 1.0),
        "1.weight": ("bn.weight", 1.0),
        "1.bias": ("bn.bias", 1.0),
    }
    assert set(e) == {"0", "5", *pairs}
    for ours_name, (their_name, unit) in pairs.items():
        torch.testing.assert_close(
            moved[ours_name].reshape(-1) / unit, e_theirs[their_name].reshape(-1), **close
        )
        torch.testing.assert_close(
            e[ours_name].reshape(-1) / unit, e_theirs[their_name].reshape(-1), **close
        )
    # the second pass: every gradient agrees (the conv clip's in our raw units: / std)
    grads = {
        "0.weight": theirs.conv.weight.grad, "5.weight": theirs.fc.weight.grad,
        **{n: getattr(theirs, t).grad if "." not in t else theirs.get_parameter(t).grad
           for n, (t, _) in pairs.items()},
    }
    for name, g in grads.items():
        ours_g = params[name].grad.reshape(-1)
        if name == "0.weight_quantizer.step":
            ours_g = ours_g * std
        torch.testing.assert_close(ours_g, g.reshape(-1), rtol=1e-3, atol=1e-6)
    # "std" differs from "authors" only on the linear layer (scaled by its own std there)
    opt.restore()
    assert opt.units(e).keys() == {"0", "0.weight_quantizer.step"}
    opt.ball = "std"
    assert opt.units(e).keys() == {"0", "0.weight_quantizer.step", "5", "5.weight_quantizer.step"}


def test_std_ball_measures_each_weight_in_its_std_and_adaptive_can_leave_biases_unscaled():
    model, rho = _model(pinned="same"), 0.3
    ((x, y),) = _batches(1)
    reference = _grad_wrt_qweights(model, x, y)
    stds = {n: m.weight.detach().std() for n, m in quant_layers(model)}
    opt = SAQ(_sgd(model), model, rho=rho, ball="std")
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    e = opt.perturbation()
    in_std = torch.sqrt(sum(((e[n] / stds[n]) ** 2).sum() for n in e))
    assert in_std.item() == pytest.approx(rho, rel=1e-5)  # ||e / std|| = rho, not ||e||
    total = torch.sqrt(sum(((stds[n] * g) ** 2).sum() for n, g in reference.items()))
    for n, g in reference.items():
        torch.testing.assert_close(e[n], rho * stds[n] ** 2 * g / total, rtol=1e-4, atol=1e-9)
    raw = SAQ(_sgd(model), model, rho=rho, ball="raw")
    raw._kept = opt._kept
    e_raw = raw.perturbation()
    ratio = {n: (e_raw[n].norm() / e[n].norm()).item() for n in e}
    assert min(ratio.values()) > 1.5 and max(ratio.values()) > 10  # raw: larger for one rho

    # adaptive, biases in the ball: T = |x| + eta * unit for weights, T = 1 for biases
    model.zero_grad()
    opt = SAQ(
        _sgd(model), model, rho=rho, adaptive=True, adaptive_bias=False, bias=True, norm=True,
        ball="raw",
    )
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    kept = {n: t.detach() for n, t in opt._kept.tensors().items()}
    e = opt.perturbation()
    assert opt.biases and opt.biases <= set(e)
    params = dict(model.named_parameters())
    t = {n: (kept[n] if n in kept else params[n].detach()).abs() + 0.01 for n in e}
    for n in opt.biases:
        t[n] = torch.ones_like(t[n])
    torch.testing.assert_close(
        torch.sqrt(sum(((v / t[n]) ** 2).sum() for n, v in e.items())), torch.tensor(rho)
    )
    b = next(iter(opt.biases))
    g_b = params[b].grad
    g_t = torch.sqrt(sum(((t[n] * g) ** 2).sum() for n, g in opt._gradients()[0].items()))
    torch.testing.assert_close(e[b], rho * g_b / g_t, rtol=1e-5, atol=1e-9)
