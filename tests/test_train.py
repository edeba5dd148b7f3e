"""Trainer: hooks, exact resume, early stopping, schedule, optimizer groups, config, DDP."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import Killer, free_port, pretend_torchrun

import qatlab
from qatlab.errors import ConfigError
from qatlab.methods import METHODS, build_hooks, check_options, register_method
from qatlab.train import Hook, RunConfig, TrainConfig, fit, load_config
from qatlab.train.checkpoint import load_checkpoint
from qatlab.train.loop import lr_factor
from qatlab.train.metrics import read_jsonl
from qatlab.train.optim import LogAdam, make_optimizer, quantizer_parameters
from qatlab.train.runner import build, run


def small_model(data, quant: bool = False) -> torch.nn.Module:
    from qatlab import models

    torch.manual_seed(0)
    model = models.create("cnn1d", data.num_classes, data.input_shape)
    if quant:
        model = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
        qatlab.calibrate(model, [data.train_eval[i][0][None] for i in range(64)])
    return model


FAST = dict(epochs=2, batch_size=64, lr=3e-3, progress=False, eval_batch_size=1000)


# ----------------------------------------------------------------------------- hooks
class GradProbe(Hook):
    """Keeps the gradients of the first step (they are still in .grad after optimizer.step)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def after_step(self, model, step, total_steps):
        if step == 0:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return None


class PullTerm(Hook):
    """Loss term ``scale * sum(w)`` on one weight: adds exactly ``scale`` to its gradient."""

    def __init__(self, name: str, scale: float) -> None:
        self.name, self.scale = name, scale

    def loss_term(self, model, step, total_steps):
        return self.scale * dict(model.named_parameters())[self.name].sum()


def test_loss_term_adds_its_gradient(tiny_data):
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    name = next(n for n, p in small_model(tiny_data).named_parameters() if p.dim() > 1)
    plain, pulled = GradProbe(), GradProbe()
    fit(small_model(tiny_data), tiny_data, cfg, hooks=[plain])
    fit(small_model(tiny_data), tiny_data, cfg, hooks=[PullTerm(name, 0.5), pulled])
    diff = pulled.grads[name] - plain.grads[name]
    torch.testing.assert_close(diff, torch.full_like(diff, 0.5), rtol=0, atol=1e-5)
    others = [n for n in plain.grads if n != name]
    assert all(torch.equal(plain.grads[n], pulled.grads[n]) for n in others)


class Counter(Hook):
    """Counts steps; logs the count every 4 steps; its count is checkpointed state."""

    def __init__(self) -> None:
        self.count = 0

    def after_step(self, model, step, total_steps):
        self.count += 1
        return {"count": self.count, "at_step": step} if (step + 1) % 4 == 0 else None

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_kill_and_resume_ends_with_identical_weights(tiny_data, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 3}, bn_reestimate=True, bn_batches=2)
    whole = Counter()
    summary = fit(
        small_model(tiny_data, quant=True),
        tiny_data,
        cfg,
        hooks=[whole, Killer(None)],
        run_dir=tmp_path / "whole",
    )
    steps = summary["steps"] // 3
    # killed in the middle of epoch 2: ckpt.pt holds epoch 1
    with pytest.raises(KeyboardInterrupt):
        fit(
            small_model(tiny_data, quant=True),
            tiny_data,
            cfg,
            hooks=[Counter(), Killer(steps + steps // 2)],
            run_dir=tmp_path / "cut",
        )
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["epoch"] == 1
    resumed = Counter()
    # a fresh model object (as after a crash): everything comes from the checkpoint
    fit(
        small_model(tiny_data, quant=True),
        tiny_data,
        cfg,
        hooks=[resumed, Killer(None)],
        run_dir=tmp_path / "cut",
        resume=True,
    )
    a = load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "cut" / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    assert resumed.count == whole.count == 3 * steps  # hook state survived the restart

    def epochs(run):
        recs = read_jsonl(tmp_path / run / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "time_s"} for r in recs]

    assert epochs("whole") == epochs("cut")  # the log reads as if never interrupted
    logged = [r for r in epochs("whole") if "count" in r]
    assert [r["count"] for r in logged] == list(range(4, 3 * steps + 1, 4))
    assert all(r["step"] == r["at_step"] + 1 for r in logged)


def test_resume_is_exact_with_a_stateful_registered_method(tiny_data_config, tmp_path):
    """Iterative freezing keeps trackers, masks and frozen integers in module buffers."""
    raw = {
        "data": tiny_data_config,
        "quant": {"weight_bits": 3, "act_bits": 4},
        "method": {
            "name": "freeze",
            "momentum": 0.2,
            "threshold_start": 0.02,
            "threshold_end": 0.01,
            "start": 0.0,
            "log_every": 0,
        },
        "train": {**FAST, "epochs": 3},
    }

    def go(name: str, kill_at: int | None, resume: bool = False):
        cfg = RunConfig.from_dict({**raw, "name": name, "out_dir": str(tmp_path)})
        model, data, hooks = build(cfg, resume=resume)
        fit(
            model,
            data,
            cfg.train,
            hooks=[*hooks, Killer(kill_at)],
            run_dir=cfg.run_dir,
            resume=resume,
            run_config=cfg,
        )
        return model, hooks[0]

    whole, tracker = go("whole", None)
    assert tracker.frozen_share() > 0.01  # something froze, so the state matters
    with pytest.raises(KeyboardInterrupt):
        go("cut", 25)
    resumed, tracker2 = go("cut", None, resume=True)
    assert tracker2.frozen_share() == tracker.frozen_share()
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


class Score(Hook):
    """An eval metric that peaks at epoch 2 (val only), to drive early stopping."""

    def __init__(self) -> None:
        self.calls = 0

    def eval_metrics(self, model, data, split):
        if split != "val":
            return None
        self.calls += 1
        return {"score": -abs(self.calls - 3)}  # epoch 0 -> call 1, epoch 2 -> call 3 (best)


def test_early_stopping_on_a_hook_metric_restores_best(tiny_data, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 10}, early_stop_metric="val_score", patience=2)
    summary = fit(small_model(tiny_data), tiny_data, cfg, hooks=[Score()], run_dir=tmp_path)
    assert summary["stopped_early"] and summary["epochs_run"] == 4
    assert summary["best_epoch"] == 2 and summary["best_value"] == 0
    assert summary["final_epoch"] == 2
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    rec = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["epoch"] == 2][-1]
    assert summary["val_acc"] == rec["val_acc"]


def test_unknown_early_stop_metric_fails_before_writing(tiny_data, tmp_path):
    cfg = TrainConfig(**FAST, early_stop_metric="val_acc_ptq")
    with pytest.raises(ConfigError, match="val_acc_ptq.*val_acc"):
        fit(small_model(tiny_data), tiny_data, cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_quantized_w4a4_run_beats_chance(tiny_data_config, tmp_path):
    cfg = RunConfig.from_dict(
        {
            "out_dir": str(tmp_path),
            "data": tiny_data_config,
            "model": {"name": "cnn1d"},
            "quant": {"weight_bits": 4, "act_bits": 4},
            "train": {**FAST, "epochs": 4},
        }
    )
    assert cfg.method.name == "qat" and cfg.name == "mnist1d-cnn1d-qat-w4a4-s0"
    summary = run(cfg, verbose=False)
    assert summary["test_acc"] > 0.4  # chance is 0.1
    ckpt = load_checkpoint(cfg.run_dir / "best.pt")
    assert ckpt["quant"]["weight_bits"] == 4 and any("step" in k for k in ckpt["model"])


# ----------------------------------------------------------------------------- schedule, optimizer
def test_cosine_schedule_per_step_and_per_epoch():
    cfg = TrainConfig(min_lr=0.1)
    assert lr_factor(cfg, 0, 10, 100) == 1.0
    assert lr_factor(cfg, 50, 10, 100) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.1)
    per_epoch = dataclasses.replace(cfg, schedule_per="epoch")
    assert {lr_factor(per_epoch, s, 10, 100) for s in range(10, 20)} == {
        lr_factor(cfg, 10, 10, 100)
    }
    assert lr_factor(TrainConfig(schedule="constant"), 77, 10, 100) == 1.0


def test_step_sizes_get_their_own_lr_and_no_weight_decay(tiny_data):
    model = small_model(tiny_data, quant=True)
    wsteps = {id(p) for p in quantizer_parameters(model, "weight")}
    asteps = {id(p) for p in quantizer_parameters(model, "input")}
    assert wsteps and asteps  # LSQ step sizes are parameters
    cfg = TrainConfig(
        optimizer="sgd",
        lr=0.01,
        weight_decay=5e-5,
        quant_lr=1e-5,
        quant_optimizer=None,
        act_quant_lr=None,
        act_quant_optimizer=None,
    )
    opt = make_optimizer(model, cfg)
    weights, wq, aq = opt.param_groups
    assert {id(p) for p in wq["params"]} == wsteps and {id(p) for p in aq["params"]} == asteps
    assert wq["lr"] == aq["lr"] == 1e-5 and wq["weight_decay"] == aq["weight_decay"] == 0.0
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 5e-5
    pair = make_optimizer(model, dataclasses.replace(cfg, quant_optimizer="adam"))
    assert [type(o).__name__ for o in pair.optimizers] == ["SGD", "Adam"]
    assert [g["lr"] for g in pair.optimizers[1].param_groups] == [1e-5, 1e-5]
    scratch = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.01).validate())
    assert [type(o).__name__ for o in scratch.optimizers] == ["SGD", "LogAdam", "Adam"]
    assert [g["lr"] for g in scratch.param_groups] == [0.01, 5e-3, 1e-5]
    assert {id(p) for p in scratch.optimizers[1].param_groups[0]["params"]} == wsteps


def test_step_size_recipe_depends_on_how_the_run_starts(tmp_path):
    """auto: from scratch the weight steps train with LogAdam at lr 5e-3 and
    activation steps with Adam at 1e-5; from a checkpoint, all steps Adam at 1e-5."""
    scratch = load_config(None, ["quant.weight_bits=2"])
    assert (scratch.train.quant_optimizer, scratch.train.quant_lr) == ("logadam", 5e-3)
    assert (scratch.train.act_quant_optimizer, scratch.train.act_quant_lr) == ("adam", 1e-5)
    assert scratch.quant.weight_init == "meanabs"
    ckpt = tmp_path / "float.pt"
    ckpt.write_bytes(b"x")
    tuned = load_config(None, ["quant.weight_bits=2", f"init_from={ckpt}"])
    assert (tuned.train.quant_optimizer, tuned.train.quant_lr) == ("adam", 1e-5)
    assert tuned.quant.weight_init == "mse"  # fine-tuning: exactly the previous defaults
    explicit = load_config(None, ["train.quant_lr=1e-4", "train.quant_optimizer=sgd"])
    assert (explicit.train.quant_optimizer, explicit.train.quant_lr) == ("sgd", 1e-4)
    bare = TrainConfig(lr=0.02).validate()  # a bare TrainConfig: the from-scratch recipe
    assert bare.resolve_lr(bare.quant_lr) == 5e-3  # a relative rate: not tied to train.lr
    assert bare.quant_optimizer == "logadam"
    tenth = load_config(None, ["train.quant_lr=0.1x", "train.lr=0.02"]).train
    assert tenth.resolve_lr(tenth.quant_lr) == pytest.approx(0.002)
    for bad in ("train.quant_lr=fast", "train.quant_lr=-1x", "train.act_quant_lr=x"):
        with pytest.raises(ConfigError, match="quant_lr"):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="logadam"):
        load_config(None, ["train.quant_optimizer=lion"])


# ----------------------------------------------------------------------------- config
def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "model": {"name": "mlp5"},
                "train": {"lr": "1e-3", "epochs": 3, "optimizer": "sgd"},
                "quant": {"weight_bits": 3, "act_bits": None},
            }
        )
    )
    cfg = load_config(path, ["train.lr=0.02", "quant.weight_grid=restricted", "data.seed=4"])
    assert cfg.train.lr == 0.02 and cfg.train.epochs == 3 and cfg.train.optimizer == "sgd"
    assert cfg.quant.weight_bits == 3 and cfg.quant.act_bits is None
    assert cfg.quant.weight_grid == "restricted" and cfg.data.seed == 4
    assert load_config(path).train.lr == 1e-3  # PyYAML reads 1e-3 as a string: coerced
    assert load_config(path, ["quant=null"]).quant is None
    # round trip: the saved config.yaml loads back to the same config
    again = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epocs=3", "unknown key 'epocs' in train (did you mean 'epochs'?)"),
        ("trian.lr=1", "unknown key 'trian' in the config (did you mean 'train'?)"),
        ("quant.weight_bit=4", "unknown key 'weight_bit' in quant (did you mean 'weight_bits'?)"),
        ("train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
        ("train.progress=3", "train.progress must be true or false"),
        ("train.optimizer=adma", "did you mean 'adam'"),
        ("quant.weight_bits=1", "weight_bits must be an integer from 2 to 8"),
        ("model.name=resnet1000", "model.name must be one of"),
        ("data.name=mnist2d", "did you mean 'mnist1d'"),
        ("method.name=dampn", "unknown method 'dampn'"),
        ("method.lambda_max=0.1", "unknown key 'lambda_max' in method float; it takes no options"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train=3", "train must be a mapping"),
        ("noequals", "--set expects key=value"),
    ],
)
def test_config_errors_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def scratch_methods():
    """Methods a test registers are unregistered after it (the demo runs every registered one)."""
    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


def test_method_options_aliases_and_types(scratch_methods):
    @register_method("_toy", aliases={"lambda": "lambda_max"}, needs_quant=True)
    def _toy(model, quant, total_steps, lambda_max=0.1, start=0.25, bits=3):
        """A toy method."""
        return [PullTerm("w", lambda_max)]

    opts = check_options("_toy", {"lambda": 2, "bits": 4})
    assert opts == {"lambda_max": 2.0, "start": 0.25, "bits": 4}
    with pytest.raises(ConfigError, match="method.bits must be an integer, got 2.5"):
        check_options("_toy", {"bits": 2.5})
    with pytest.raises(ConfigError, match="did you mean 'start'"):
        check_options("_toy", {"strat": 0.5})
    with pytest.raises(ConfigError, match="trains a quantized model"):
        build_hooks("_toy", {}, torch.nn.Linear(2, 2), None, 10)
    hooks = build_hooks("_toy", {"lambda": 3.0}, torch.nn.Linear(2, 2), qatlab.QuantConfig(), 10)
    assert hooks[0].scale == 3.0


def test_build_runs_method_hooks_on_the_quantized_model(
    tiny_data_config, tmp_path, scratch_methods
):
    seen = {}

    @register_method("_probe", needs_quant=True)
    def _probe(model, quant, total_steps):
        seen.update(quantized=qatlab.quant.is_quantized(model), total=total_steps)
        return []

    cfg = RunConfig.from_dict(
        {
            "out_dir": str(tmp_path),
            "data": tiny_data_config,
            "quant": {"weight_bits": 4},
            "method": {"name": "_probe"},
            "train": {**FAST},
        }
    )
    model, data, hooks = build(cfg)
    steps = len(data.train) // FAST["batch_size"]
    assert seen == {"quantized": True, "total": FAST["epochs"] * steps}
    assert not (tmp_path / cfg.name).exists()  # building writes nothing


# ----------------------------------------------------------------------------- distributed
DDP_TRAIN = dict(epochs=2, lr=3e-3, progress=False, device="cpu", restore_best=False)


def _record_batches(model: torch.nn.Module) -> list[float]:
    """Sum of every training batch ``model`` sees (a fingerprint of which samples it got)."""
    seen: list[float] = []

    def hook(module, args):
        if module.training:
            seen.append(float(args[0].double().sum()))

    model.register_forward_pre_hook(hook)
    return seen


def _ddp_worker(rank: int, port: int, cache: str, out: str) -> None:
    pretend_torchrun(rank, port)
    torch.set_num_threads(1)
    from qatlab import data
    from qatlab.train.distributed import sync_batchnorm

    bundle = data.load("mnist1d", num_samples=600, cache_dir=cache, augment=False)
    cfg = TrainConfig(batch_size=32, **DDP_TRAIN)  # per process: a global batch of 64
    model = sync_batchnorm(small_model(bundle))  # cnn1d has BatchNorm
    seen = _record_batches(model)
    fit(model, bundle, cfg, run_dir=Path(out) / "run")
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")  # each rank's own weights
    torch.save(seen, Path(out) / f"seen{rank}.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_gloo_run_matches_one_process(tmp_path, data_cache):
    """Two processes with batch 32 and synchronized BatchNorm: each rank sees its own shard,
    the ranks end identical, and they match one process trained with batch 64."""
    from qatlab import data

    bundle = data.load("mnist1d", num_samples=600, cache_dir=str(data_cache), augment=False)
    torch.multiprocessing.spawn(
        _ddp_worker, args=(free_port(), str(data_cache), str(tmp_path)), nprocs=2, join=True
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "ckpt.pt",
        "curves.png",
        "init.pt",
        "metrics.jsonl",
        "summary.json",
    ]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and not math.isnan(summary["test_acc"])
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0 if isinstance(r0[k], torch.Tensor))

    torch.set_num_threads(1)
    one = small_model(bundle)
    one_seen = _record_batches(one)
    fit(one, bundle, TrainConfig(batch_size=64, **DDP_TRAIN))
    seen0, seen1 = torch.load(tmp_path / "seen0.pt"), torch.load(tmp_path / "seen1.pt")
    assert len(seen0) == len(seen1) == len(one_seen) > 0
    assert all(abs(a - b) > 1e-3 for a, b in zip(seen0, seen1, strict=True))  # own shards
    for a, b, both in zip(seen0, seen1, one_seen, strict=True):  # together: the global batch
        assert a + b == pytest.approx(both, rel=1e-9, abs=1e-6)
    one_state = one.state_dict()
    for key, value in r0.items():
        if value.is_floating_point():  # weights, BN statistics, quantizer steps
            assert torch.allclose(value, one_state[key], rtol=1e-4, atol=1e-5), key
        else:
            assert torch.equal(value, one_state[key]), key


def test_build_under_torchrun_syncs_batchnorm_and_calibrates_on_global_batches(
    tiny_data_config, tmp_path, monkeypatch
):
    from qatlab.train.distributed import SyncBatchNorm

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = RunConfig.from_dict(
        {
            "name": "ddp",
            "out_dir": str(tmp_path),
            "data": tiny_data_config,
            "model": {"name": "cnn1d"},
            "quant": {"weight_bits": 4, "act_bits": 4},
            "train": {**FAST, "batch_size": 32, "device": "cpu"},
        }
    )
    model, data, _ = build(cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, SyncBatchNorm) for m in bns)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process with the global batch of 64
    one_cfg = RunConfig.from_dict({**cfg.to_dict(), "train": {**FAST, "device": "cpu"}})
    one, _, _ = build(one_cfg)
    steps = {k: v for k, v in model.state_dict().items() if k.endswith(".step")}
    one_steps = one.state_dict()
    assert steps and all(torch.equal(v, one_steps[k]) for k, v in steps.items())
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.train.calib_batches = 0
    with pytest.raises(ConfigError, match="calib_batches"):
        build(cfg)


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.epochs >= 1


# the README's Python blocks run (and learn) in tests/test_readme.py


# ----------------------------------------------------------------------------- LogAdam
def test_logadam_is_adam_on_log_of_the_parameter():
    """LogAdam's trajectory equals torch's Adam run on u = log p with gradient p * dL/dp."""
    torch.manual_seed(0)
    target = torch.rand(5) + 0.5
    p = torch.nn.Parameter(torch.rand(5) * 0.1 + 0.01)
    start = p.detach().clone()
    u = torch.nn.Parameter(start.log())
    log_adam, adam = LogAdam([p], lr=0.05), torch.optim.Adam([u], lr=0.05)
    for _ in range(40):
        for opt in (log_adam, adam):
            opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        ((u.exp() - target) ** 2).sum().backward()
        log_adam.step()
        adam.step()
    torch.testing.assert_close(p.detach(), u.detach().exp(), rtol=1e-5, atol=0)
    assert (p > 2 * start).all()  # grew several-fold, each move at most ~5% relative


def test_logadam_moves_are_relative_and_linear_groups_are_adam():
    """Every update changes a step by at most ~lr relative to its size, large or tiny (plain
    Adam's absolute moves zero a 1e-3 step in a few updates); ``log=False`` is plain Adam."""
    steps = torch.nn.Parameter(torch.tensor([1e-3, 1.0]))
    offset = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    twin = torch.nn.Parameter(offset.detach().clone())
    opt = LogAdam([{"params": [steps]}, {"params": [offset], "log": False}], lr=0.01)
    adam = torch.optim.Adam([twin], lr=0.01)
    for _ in range(20):
        before = steps.detach().clone()
        opt.zero_grad()
        adam.zero_grad()
        (steps.sum() + (offset**2).sum()).backward()  # always pushes the steps down
        (twin**2).sum().backward()
        opt.step()
        adam.step()
        ratio = steps.detach() / before
        assert torch.all(ratio < 1) and torch.all(ratio > math.exp(-0.0101))
    torch.testing.assert_close(offset.detach(), twin.detach())
    state = opt.state_dict()
    clone = LogAdam([{"params": [steps]}, {"params": [offset], "log": False}], lr=0.01)
    clone.load_state_dict(state)
    assert clone.state[steps]["step"] == 20
