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
def test_paper_law_u_rises_below_target_and_falls_to_zero_above():
    model = toy_model()
    opt = TALR(
        torch.optim.SGD(model.parameters(), lr=0.1), model, 1000, schedule="constant",
        controller="paper",
    )  # fmt: skip
    r0 = 5e-3 * math.sqrt(2)
    assert opt.R0[GLOBAL] == pytest.approx(r0) and opt.m == 0.99
    assert float(opt.U[GLOBAL]) == opt.eta == 0.1  # U_0 = eta = the initial LR
    us = []
    for _ in range(20):  # measured rate 0 < R_t: U climbs by eta * (R_t - K_t) each step
        opt.observe({GLOBAL: 0.0})
        us.append(float(opt.U[GLOBAL]))
    assert all(b > a for a, b in zip([0.1, *us], us, strict=False))
    assert us[0] == pytest.approx(0.1 + 0.1 * r0)
    for _ in range(300):  # rate 1 >> R_t: K_t climbs towards 1, U falls and stops at 0
        before = float(opt.U[GLOBAL])
        opt.observe({GLOBAL: 1.0})
        assert 0.0 <= float(opt.U[GLOBAL]) <= before
    assert float(opt.U[GLOBAL]) == 0.0
    assert float(opt.K[GLOBAL]) == pytest.approx(1 - 0.99**300, rel=1e-6)  # K = m K + (1-m) k
    assert opt.t == 320


def test_paper_law_matches_its_formula_step_by_step():
    """The literal law on a cosine target, against a float reference, with R of index t."""
    model = toy_model(3)
    T, eta, u0, m = 200, 0.03, 0.05, 0.97
    opt = TALR(
        torch.optim.SGD(model.parameters(), lr=0.05), model, T, lam=2e-3, momentum=m,
        controller="paper", eta=eta, u0=u0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    rates = (torch.rand(T, generator=gen, dtype=torch.float64) * 0.01).tolist()
    r0, K, U = 2e-3 * math.sqrt(3), 0.0, u0
    for t, k in enumerate(rates):
        R = r0 * 0.5 * (1 + math.cos(math.pi * t / T))
        K = m * K + (1 - m) * k
        U = max(0.0, U + eta * (R - K))
        opt.observe({GLOBAL: k})
        assert opt.R[GLOBAL] == pytest.approx(R, rel=1e-12, abs=1e-18)
        assert float(opt.K[GLOBAL]) == pytest.approx(K, rel=1e-12, abs=1e-18)
        assert float(opt.U[GLOBAL]) == pytest.approx(U, rel=1e-12, abs=1e-18)
    assert 0 < U < u0  # the sequence exercised both directions


@pytest.mark.parametrize("alpha", [0.65, 1.0, 1.5])
def test_tracking_law_reaches_the_target_of_a_power_law_plant(alpha):
    """k = min(1, a * U^alpha) (the measured plant is close to alpha ~ 0.65): from U_0 100x
    off, the tracking law brings k to R within 5% in 100 steps on a constant target, and
    follows a cosine within 25% down to R_0 / 10 and within a factor 2 down to R_0 / 1000
    (its feed-forward assumes alpha = 1; the running gain corrects the rest with a lag). U
    changes by at most max_change a step."""
    model = toy_model()
    a = 5e-3 * math.sqrt(2) / 0.01**alpha  # k = R_0 at U = 0.01, 100x below U_0 = 1
    for schedule in ("constant", "cosine"):
        opt = TALR(
            torch.optim.SGD(model.parameters(), lr=1.0), model, 1000, schedule=schedule,
            momentum=0.95,
        )  # fmt: skip
        r0, near, far = opt.R0[GLOBAL], [], []
        for t in range(1000):
            u = float(opt.U[GLOBAL])
            k = min(1.0, a * u**alpha)
            opt.observe({GLOBAL: k})
            u_next = float(opt.U[GLOBAL])
            if opt.target(GLOBAL, t + 1) > 0:  # (the cosine's last target is 0: U = 0)
                assert u / 2 <= u_next <= 2 * u
            R = opt.target(GLOBAL, t)
            if t >= 100 and R > 1e-3 * r0:
                (near if R > 0.1 * r0 else far).append(k / R)
        tol = 1.05 if schedule == "constant" else 1.25
        assert 1 / tol < min(near) and max(near) < tol, (schedule, min(near), max(near))
        if far:
            assert 1 / 2 < min(far) and max(far) < 2, (schedule, min(far), max(far))


def test_tracking_u_recovers_from_zero_when_the_target_rises():
    """Target 0 for 30 steps (U goes to 0 and nothing moves), then R_0: U is positive again
    at the next step and k reaches the target within a few steps (plant k = 0.5 * U)."""
    model = toy_model()

    def schedule(t, total, r0):
        return 0.0 if t < 30 else r0

    opt = TALR(
        torch.optim.SGD(model.parameters(), lr=0.1), model, 200, schedule=schedule,
        momentum=0.9,
    )  # fmt: skip
    us, ks = [], []
    for _ in range(200):
        us.append(float(opt.U[GLOBAL]))
        ks.append(0.5 * us[-1])
        opt.observe({GLOBAL: ks[-1]})
    assert us[1:30] == [0.0] * 29  # U_{t+1} = 0 where R_{t+1} = 0
    assert us[30] > 0.0  # the step whose target is R_0 already has a positive U
    r0 = opt.R0[GLOBAL]
    assert all(0.5 * r0 <= k <= 2 * r0 for k in ks[45:])


def test_target_schedules():
    assert target_rate(0, 100, 0.01) == pytest.approx(0.01)
    assert target_rate(50, 100, 0.01) == pytest.approx(0.005)
    assert target_rate(100, 100, 0.01) == pytest.approx(0.0, abs=1e-12)
    assert target_rate(49, 100, 0.01, "step") == 0.01
    assert target_rate(50, 100, 0.01, "step") == pytest.approx(1e-3)
    assert target_rate(80, 100, 0.01, "step") == pytest.approx(1e-4)
    assert target_rate(99, 100, 0.01, "constant") == 0.01


def run_small(controller: str, steps: int = 300, lam: float = 1e-3, adam: bool = False):
    """Train a quantized MLP (32-128-128-10, W2A4: the 128x128 layer is counted) with TALR and
    a constant target on a stream of fresh samples labelled by a fixed random teacher (no
    data set to memorize, so the rate a given U makes stays comparable over the run); returns
    per-step (R_t, K_t, U_{t+1}) and the controller."""
    torch.manual_seed(0)
    teacher = nn.Linear(32, 10)
    net = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    model = qatlab.quantize(net, qatlab.QuantConfig(weight_bits=2, act_bits=4))
    qatlab.calibrate(model, [torch.randn(256, 32)])
    hook = TALRHook(model, steps, lam=lam, schedule="constant", controller=controller)
    base = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    opt = hook.wrap_optimizer(base, model)
    gen = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = teacher(x).argmax(1)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        trace.append((opt.R[GLOBAL], float(opt.K[GLOBAL]), float(opt.U[GLOBAL])))
    return trace, opt


@pytest.mark.parametrize("adam", [False, True])
def test_tracking_keeps_the_running_rate_within_2x_of_a_constant_target(adam):
    """Real training (a small quantized MLP, SGD or Adam): after a warm-up of 100 steps the
    running rate K_t stays within a factor of 2 of the constant target at every step, with the
    tracking controller; the paper's law, same run, does not get there (its U moves < 1% a
    step)."""
    trace, opt = run_small("tracking", adam=adam)
    ratios = [K / R for R, K, _ in trace[100:]]
    assert 0.5 < min(ratios) and max(ratios) < 2.0, (min(ratios), max(ratios))
    assert opt.m == 0.9  # window clamp(300 / 50, 10, 100) = 10 steps
    paper, _ = run_small("paper", adam=adam)
    missed = [K / R for R, K, _ in paper[100:]]
    assert max(missed) > 2.0 or min(missed) < 0.5, (min(missed), max(missed))


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
    assert float(opt.k[GLOBAL]) == 37 / layer.weight.numel()
    assert float(opt.K[GLOBAL]) == pytest.approx((1 - opt.m) * 37 / layer.weight.numel())


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("per_layer", [False, True])
def test_only_the_latent_weights_of_free_layers_get_u(per_layer):
    """Plain SGD (no momentum): a TALR weight moves by -U * grad, every other parameter by
    -lr * grad with the loop's lr, which is back in the groups after the step."""
    model = toy_model()
    free = [m.weight for _, m in quant_layers(model) if not m.weight_quantizer.fixed_bits]
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for g in base.param_groups:
        g["initial_lr"] = g["lr"]
    opt = TALRHook(model, 100, per_layer=per_layer, u0=0.7).wrap_optimizer(base, model)
    talr = [g for g in base.param_groups if "talr" in g]
    assert {id(p) for g in talr for p in g["params"]} == {id(p) for p in free}
    assert all(g["initial_lr"] == 0.01 and g["momentum"] == 0.9 for g in talr)
    for g in base.param_groups:  # what the loop does: its scheduled lr
        g["lr"] = 0.005
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        return torch.zeros(())

    opt.step(closure)  # first step of momentum SGD: the update is -lr * grad
    moved = 0
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        lr = 0.7 if any(p is q for q in free) else 0.005
        torch.testing.assert_close(p.detach(), before[n] - lr * p.grad, rtol=0, atol=1e-6)
        moved += bool((p.detach() != before[n]).any())
    assert moved >= 4
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
    frozen_keys = {k for k in start if ".weight_quantizer." in k and k.rsplit(".", 2)[0] in frozen}
    assert frozen_keys == {f"{n}.weight_quantizer.step" for n in frozen} and frozen_keys
    assert frozen_keys == {"2.weight_quantizer.step"}  # the middle linear, the only free one
    for key in frozen_keys:
        assert torch.equal(start[key], end[key]), key  # frozen under TALR
    pinned = [k for k in start if ".weight_quantizer." in k and k not in frozen_keys]
    assert pinned == ["0.weight_quantizer.step", "4.weight_quantizer.step"]  # 8-bit first, last
    assert all(model.get_parameter(k).requires_grad for k in pinned)
    act = [k for k in start if ".input_quantizer." in k]
    assert any(not torch.equal(start[k], end[k]) for k in act)  # activation steps learn
    assert hook.optimizer.t == 20
    assert float(hook.optimizer.U[GLOBAL]) == 0.0  # the cosine's next target is 0
    assert float(hook.optimizer.K[GLOBAL]) > 0  # counted weights moved


# ----------------------------------------------------------------------------- state
def test_state_round_trips_through_state_dict():
    model = toy_model()
    opt = TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 100, per_layer=True)
    for i in range(7):
        opt.observe({k: 0.001 * i * (j + 1) for j, k in enumerate(opt.keys)})
    state = opt.state_dict()
    fresh = TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 100, per_layer=True)
    fresh.load_state_dict(state)
    assert fresh.t == opt.t == 7
    for name in ("U", "K", "A", "W", "k"):
        a, b = getattr(fresh, name), getattr(opt, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert fresh.R == opt.R and fresh.Rbar == opt.Rbar
    assert float(opt.U[opt.keys[0]]) not in (0.0, 1e-3) and float(opt.A[opt.keys[0]]) > 0


def test_registry_options_and_cli_lambda_alias():
    opts = check_options("talr", {"lambda": 0.01, "schedule": "step"})
    assert opts["lam"] == 0.01 and opts["schedule"] == "step" and opts["momentum"] == 0.0
    assert opts["controller"] == "tracking"
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
    for name in ("U", "K", "A", "W"):
        assert torch.equal(getattr(h1.optimizer, name)[GLOBAL], getattr(h2.optimizer, name)[GLOBAL])
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_curves_get_a_transition_rate_panel_when_records_carry_tr(tmp_path, monkeypatch):
    """The figure itself (captured before it is saved): two panels without ``tr``; with it a
    third whose lines are k_t, K_t, R_t and a twin axis with U_t, holding the logged values."""
    from qatlab.train import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
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
    plots.plot_curves(epochs, tmp_path / "plain.png")
    plots.plot_curves(epochs + steps, tmp_path / "tr.png", title="talr")
    plots.plot_curves({"a": epochs + steps, "b": epochs}, tmp_path / "both.png")
    plain, with_tr, both = figures
    assert len(plain.axes) == 2
    for fig, prefix in ((with_tr, ""), (both, "a ")):
        assert len(fig.axes) == 4  # loss, accuracy, rates and the rates panel's twin U axis
        rates, u_axis = fig.axes[2], fig.axes[3]
        assert rates.get_ylabel() == "transition rate (%)"
        lines = {ln.get_label(): ln for ln in rates.get_lines()}
        assert set(lines) == {f"{prefix}TR k_t", f"{prefix}running TR K_t", f"{prefix}target R_t"}
        assert list(lines[f"{prefix}target R_t"].get_ydata()) == pytest.approx([0.7] * 39)
        (u_line,) = u_axis.get_lines()
        assert list(u_line.get_ydata()) == pytest.approx([0.01 + 1e-4 * s for s in range(1, 40)])


def test_train_help_lists_talr(capsys):
    from qatlab.cli import main

    assert main(["train", "--help"]) == 0
    assert "talr      QAT with a scheduled transition rate" in capsys.readouterr().out


def test_default_lambda_follows_the_latent_weights_optimizer():
    """No lambda: 5e-3 under SGD, 2e-2 under Adam (the study's validation choices); an
    explicit lambda wins; a step-size Adam beside SGD weights does not count."""
    from qatlab.methods.talr import TALR

    def make():
        torch.manual_seed(0)
        model = qatlab.quantize(
            torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                torch.nn.ReLU(), torch.nn.Linear(16, 4),
            ),
            qatlab.QuantConfig(weight_bits=3, act_bits=None),
        )
        return model

    model = make()
    assert TALR(torch.optim.SGD(model.parameters(), lr=0.1), model, 10).lam == 5e-3
    model = make()
    assert TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 10).lam == 2e-2
    model = make()
    assert TALR(torch.optim.Adam(model.parameters(), lr=1e-3), model, 10, lam=1e-3).lam == 1e-3
    model = make()
    opt = qatlab.optimizer(model, "sgd", lr=0.1)  # step sizes on their own (Adam-type) optimizer
    assert TALR(opt, model, 10).lam == 5e-3
