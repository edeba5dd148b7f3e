"""TALR (transition-rate scheduling, Lee et al.): U control law, exact transition counts, which
groups get U, frozen weight steps, state round trip and exact resume in the trainer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Killer
from torch import nn

import qatlab
from qatlab.methods import build_hooks, check_options
from qatlab.methods.talr import GLOBAL, TALR, TALRHook, target_rate
from qatlab.quant.layers import quant_layers


def toy_model(bits: int = 2) -> nn.Module:
    """Three quantized linears: the first and last pinned to 8 bits, the middle one free."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model = qatlab.quantize(net, qatlab.QuantConfig(weight_bits=bits, act_bits=4))
    qatlab.calibrate(model, [torch.randn(32, 8)])
    return model


def steps_of(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("step") or n.endswith("offset")
    }


# ----------------------------------------------------------------------------- control law
def test_u_rises_below_target_and_falls_to_zero_above():
    model = toy_model()
    opt = TALR(torch.optim.SGD(model.parameters(), lr=0.1), model, 1000, schedule="constant")
    r0 = 5e-3 * math.sqrt(2)
    assert opt.R0[GLOBAL] == pytest.approx(r0)
    assert opt.U[GLOBAL] == opt.eta == 0.1  # U_0 = eta = the initial LR
    us = []
    for _ in range(20):  # measured rate 0 < R_t: U climbs by eta * (R_t - K_t) each step
        opt.observe({GLOBAL: 0.0})
        us.append(opt.U[GLOBAL])
    assert all(b > a for a, b in zip([0.1, *us], us, strict=False))
    assert us[0] == pytest.approx(0.1 + 0.1 * r0)
    for _ in range(300):  # rate 1 >> R_t: K_t climbs towards 1, U falls and stops at 0
        before = opt.U[GLOBAL]
        opt.observe({GLOBAL: 1.0})
        assert opt.U[GLOBAL] <= before
        assert opt.U[GLOBAL] >= 0.0
    assert opt.U[GLOBAL] == 0.0
    assert opt.K[GLOBAL] == pytest.approx(1 - 0.99**300, rel=1e-6)  # K_t = m K + (1 - m) k_t
    assert opt.t == 320


def test_target_schedules():
    assert target_rate(0, 100, 0.01) == pytest.approx(0.01)
    assert target_rate(50, 100, 0.01) == pytest.approx(0.005)
    assert target_rate(100, 100, 0.01) == pytest.approx(0.0, abs=1e-12)
    assert target_rate(49, 100, 0.01, "step") == 0.01
    assert target_rate(50, 100, 0.01, "step") == pytest.approx(1e-3)
    assert target_rate(80, 100, 0.01, "step") == pytest.approx(1e-4)
    assert target_rate(99, 100, 0.01, "constant") == 0.01


# ----------------------------------------------------------------------------- counting
def test_known_weight_change_is_counted_exactly_and_moved_with_u():
    model = toy_model()
    name, layer = next((n, m) for n, m in quant_layers(model) if not m.weight_quantizer.fixed_bits)
    q = layer.weight_quantizer
    s = float(q.step.detach())
    with torch.no_grad():  # put every weight on a bin centre inside the grid: 0 or -s
        layer.weight.copy_(torch.where(torch.rand_like(layer.weight) < 0.5, 0.0, -s))
    opt = TALR(torch.optim.SGD(model.parameters(), lr=0.05), model, 100, u0=0.2)
    assert opt.counter.layer_names == [name]
    opt.counter.update(model)  # the counter's reference: these integers
    moved = torch.zeros_like(layer.weight, dtype=torch.bool)
    moved.view(-1)[:37] = True  # 37 weights go up exactly one level

    def closure():
        opt.zero_grad()
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        layer.weight.grad = torch.where(moved, -s / 0.2, 0.0)  # w - U * g = w + s
        return torch.zeros(())

    before = layer.weight_int().clone()
    opt.step(closure)
    after = layer.weight_int()
    assert torch.equal(after - before, moved.to(after.dtype))
    assert opt.k[GLOBAL] == 37 / layer.weight.numel()
    assert opt.K[GLOBAL] == pytest.approx(0.01 * 37 / layer.weight.numel())


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("per_layer", [False, True])
def test_only_the_latent_weights_of_free_layers_get_u(per_layer):
    model = toy_model()
    free = [m.weight for _, m in quant_layers(model) if not m.weight_quantizer.fixed_bits]
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for g in base.param_groups:
        g["initial_lr"] = g["lr"]
    opt = TALRHook(model, 100, per_layer=per_layer, u0=0.7).wrap_optimizer(base, model)
    talr = [g for g in base.param_groups if "talr" in g]
    assert {id(p) for g in talr for p in g["params"]} == {id(p) for p in free}
    assert all(g["initial_lr"] == 0.01 and g["momentum"] == 0.9 for g in talr)
    seen = []
    inner = base.step

    def spy(closure=None):
        seen.extend((g.get("talr"), g["lr"]) for g in base.param_groups)
        return inner(closure)

    base.step = spy
    for g in base.param_groups:  # what the loop does: its scheduled lr
        g["lr"] = 0.005

    def closure():
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        return torch.zeros(())

    opt.step(closure)
    assert [lr for key, lr in seen if key is not None] == [0.7] * len(talr)
    assert [lr for key, lr in seen if key is None] == [0.005] * (len(seen) - len(talr))
    assert all(g["lr"] == 0.005 for g in base.param_groups)  # the loop's value is back


def test_wrapping_after_the_first_step_is_refused():
    model = toy_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    base.step()
    with pytest.raises(ValueError, match="before its first step"):
        TALR(base, model, 10)


# ----------------------------------------------------------------------------- step sizes
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_steps_frozen_activation_steps_train(optimizer):
    model = toy_model()
    hook = TALRHook(model, 20, lam=0.05)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    kwargs = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = hook.wrap_optimizer(cls(model.parameters(), lr=1e-2, **kwargs), model)
    start = steps_of(model)
    frozen = {n for n, _ in quant_layers(model) if not _.weight_quantizer.fixed_bits}
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        hook.after_step(model, step, 20)
    end = steps_of(model)
    for key, value in start.items():
        layer = key.rsplit(".", 2)[0]
        if ".weight_quantizer." in key and layer in frozen:
            assert torch.equal(value, end[key]), key  # frozen under TALR
    act = [k for k in start if ".input_quantizer." in k]
    assert any(not torch.equal(start[k], end[k]) for k in act)  # activation steps learn
    assert hook.optimizer.t == 20 and hook.optimizer.U[GLOBAL] > 0


# ----------------------------------------------------------------------------- state
def test_state_round_trips_through_state_dict():
    model = toy_model()
    opt = TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 100, per_layer=True)
    for i in range(7):
        opt.observe({k: 0.001 * i for k in opt.keys})
    state = opt.state_dict()
    fresh = TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 100, per_layer=True)
    fresh.load_state_dict(state)
    assert (fresh.t, fresh.U, fresh.K, fresh.k) == (opt.t, opt.U, opt.K, opt.k)


def test_registry_options_and_cli_lambda_alias():
    opts = check_options("talr", {"lambda": 0.01, "schedule": "step"})
    assert opts["lam"] == 0.01 and opts["schedule"] == "step" and opts["momentum"] == 0.99
    model = toy_model(3)
    (hook,) = build_hooks("talr", {"lambda": 0.01}, model, qatlab.QuantConfig(3, 3), 100)
    assert hook.options["lam"] == 0.01 and hook.transitions is not None
    from qatlab.cli import build_parser, config_from_args

    argv = ["train", "--method", "talr", "--lambda", "2e-3", "--wbits", "2", "--abits", "2"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.method.name == "talr" and cfg.method.options["lam"] == 2e-3


def test_resume_in_the_trainer_is_exact(tiny_data_config, tmp_path):
    from qatlab.train import RunConfig, fit
    from qatlab.train.runner import build

    raw = {
        "data": tiny_data_config,
        "model": {"name": "mlp5"},
        "quant": {"weight_bits": 2, "act_bits": 2},
        "method": {"name": "talr", "lambda": 0.02, "log_every": 5},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "optimizer": "sgd",
                  "progress": False, "eval_batch_size": 1000},
    }  # fmt: skip

    def go(name: str, kill_at: int | None, resume: bool = False):
        cfg = RunConfig.from_dict({**raw, "name": name, "out_dir": str(tmp_path)})
        model, data, hooks = build(cfg, resume=resume)
        fit(model, data, cfg.train, hooks=[*hooks, Killer(kill_at)], run_dir=cfg.run_dir,
            resume=resume, run_config=cfg)  # fmt: skip
        return model, hooks[0]

    whole, h1 = go("whole", None)
    with pytest.raises(KeyboardInterrupt):
        go("cut", h1.optimizer.t // 2 + 3)  # in epoch 2: ckpt.pt holds epoch 1
    resumed, h2 = go("cut", None, resume=True)
    assert h1.optimizer.t == h2.optimizer.t and h1.optimizer.t > 0
    assert h1.optimizer.U == h2.optimizer.U and h1.optimizer.K == h2.optimizer.K
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_curves_get_a_transition_rate_panel_when_records_carry_tr(tmp_path):
    from matplotlib.image import imread

    from qatlab.train.plots import plot_curves

    epochs = [
        {"epoch": e, "step": 10 * e, "train_loss": 1.0 / (e + 1), "train_acc": 0.5,
         "val_loss": 1.0 / (e + 1), "val_acc": 0.5 + 0.1 * e}
        for e in range(4)
    ]  # fmt: skip
    steps = [
        {"epoch": s // 10 + 1, "step": s, "tr": 0.01 / s, "talr_K": 0.005, "talr_R": 0.007,
         "talr_U": 0.01 + 1e-4 * s}
        for s in range(1, 40)
    ]  # fmt: skip
    plot_curves(epochs, tmp_path / "plain.png")
    plot_curves(epochs + steps, tmp_path / "tr.png", title="talr")
    plot_curves({"a": epochs + steps, "b": epochs}, tmp_path / "both.png")
    plain, with_tr = imread(tmp_path / "plain.png"), imread(tmp_path / "tr.png")
    assert with_tr.shape[1] > 1.35 * plain.shape[1]  # a third panel: 15 vs 10 inches wide
    assert imread(tmp_path / "both.png").shape[1] > 1.35 * plain.shape[1]


def test_train_help_lists_talr(capsys):
    from qatlab.cli import main

    assert main(["train", "--help"]) == 0
    assert "talr      QAT with a scheduled transition rate" in capsys.readouterr().out
