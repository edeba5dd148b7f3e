"""SAQ (Liu et al.): rho=0 is plain QAT, case 3 perturbs q(w) from dL/dq(w), case 2's diminishing
effect, exact restoration, BN statistics once per step, state round trip, registry and CLI."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatlab
from qatlab import models
from qatlab.errors import ConfigError
from qatlab.methods import build_hooks, check_options
from qatlab.methods.saq import SAQ
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
@pytest.mark.parametrize("case,every", [(3, 1), (2, 4)])
def test_rho_zero_step_is_exactly_plain_qat(case, every):
    plain = _model()
    saq_model = copy.deepcopy(plain)
    opt_plain = _sgd(plain)
    opt = SAQ(_sgd(saq_model), saq_model, rho=0.0, case=case, every=every)
    for x, y in _batches(2):
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
    opt = SAQ(_sgd(model), model, rho=rho, case=3)
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
    opt = SAQ(_sgd(model), model, rho=0.1, case=1)
    F.cross_entropy(model(x), y).backward()
    latent = {n: m.weight.grad for n, m in quant_layers(model)}
    e = opt.perturbation()
    total = torch.sqrt(sum((g**2).sum() for g in latent.values()))
    for n, g in latent.items():
        torch.testing.assert_close(e[n], 0.1 * g / total, rtol=1e-5, atol=1e-9)

    opt = SAQ(_sgd(model), model, rho=0.1, case=3, adaptive=True, eta=0.01)
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
    opt = SAQ(_sgd(model), model, rho=rho, case=2)
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
    opt3 = SAQ(_sgd(model), model, rho=rho, case=3)
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
    reference = copy.deepcopy(model)
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
    del reference


# ----------------------------------------------------------------------------- efficient variant
def test_efficient_variant_one_pass_between_fresh_steps_and_reuses_e():
    model = _model()
    opt = SAQ(_sgd(model), model, rho=0.3, every=3)
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
    for bad, msg in [({"case": 4}, "case"), ({"rho": -1.0}, "rho"), ({"every": 0}, "every")]:
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
        "1",
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
    assert summary["config"]["method"] == {
        "name": "saq",
        **{k: v for k, v in summary["config"]["method"].items() if k != "name"},
    }
    assert summary["config"]["method"]["rho"] == 0.1
    assert summary["config"]["method"]["every"] == 2
    assert summary["test_acc"] > 0.1


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
