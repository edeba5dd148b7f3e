"""The training loop: :func:`fit` (with hooks, checkpoints, resume, early stopping) and
:func:`evaluate`.

One step is ``loss = optimizer.step(closure)``; the closure zeroes the gradients, runs the
forward pass, adds every hook's loss term and back-propagates (see :mod:`qatlab.train.hooks`).
The learning rate is a pure function of the global step, so a resumed run follows exactly the
schedule of an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qatlab.errors import ConfigError
from qatlab.measure.accuracy import evaluate
from qatlab.methods.base import Hook
from qatlab.quant import Quantizer, reestimate_bn
from qatlab.train import distributed
from qatlab.train.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from qatlab.train.config import TrainConfig
from qatlab.train.metrics import MetricsLog, read_jsonl, write_json

if TYPE_CHECKING:
    from qatlab.data import DataBundle
    from qatlab.train.config import RunConfig

# train.* fields that may change when a run is resumed (everything else must match)
RESUMABLE = ("epochs", "device", "progress", "log_every", "eval_batch_size", "patience")
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "summary.json")


# ----------------------------------------------------------------------------- optimizer
class OptimizerPair:
    """Two optimizers stepped as one (e.g. SGD for weights, Adam for step sizes, as Nagel).

    Exposes what the loop and optimizer wrappers use: ``param_groups`` (both), ``zero_grad``,
    ``step(closure)`` (closure runs once), ``state_dict``/``load_state_dict``.
    """

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer) -> None:
        self.optimizers = (first, second)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {**self.optimizers[0].state, **self.optimizers[1].state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"pair": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, sub in zip(self.optimizers, state["pair"], strict=True):
            opt.load_state_dict(sub)


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learned quantizer parameters (LSQ step sizes and offsets) of ``model``."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()]


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    """The optimizer of ``cfg``: weights in one group, quantizer step sizes in another
    (``cfg.quant_lr``, no weight decay, and ``cfg.quant_optimizer`` if it differs)."""
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if id(p) not in quant_ids]
    steps = [p for p in params if id(p) in quant_ids]
    quant_lr = cfg.quant_lr if cfg.quant_lr is not None else cfg.lr
    main = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    side = [{"params": steps, "lr": quant_lr, "weight_decay": 0.0}] if steps else []
    if cfg.quant_optimizer in (None, cfg.optimizer) or not side:
        return _optimizer(cfg.optimizer, main + side, cfg)
    return OptimizerPair(
        _optimizer(cfg.optimizer, main, cfg), _optimizer(cfg.quant_optimizer, side, cfg)
    )


def _optimizer(name: str, groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("train.nesterov needs train.momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the initial LR at global ``step``: cosine from 1 to ``min_lr`` or constant."""
    if cfg.schedule == "constant":
        return 1.0
    t = step if cfg.schedule_per == "step" else (step // steps_per_epoch) * steps_per_epoch
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(t / max(total_steps, 1), 1.0)))
    return cfg.min_lr + (1.0 - cfg.min_lr) * cosine


# ----------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    hooks: Sequence[Hook] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    run_config: RunConfig | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train``; return the summary (also ``run_dir/summary.json``).

    Every epoch: train, (re-estimate BN), evaluate on ``data.val`` plus the hooks' eval
    metrics, track the best ``cfg.early_stop_metric`` (``best.pt``), write ``ckpt.pt``
    atomically, append to ``metrics.jsonl``. ``resume=True`` continues from ``ckpt.pt`` and
    ends with exactly the weights of an uninterrupted run. Under torchrun the model is wrapped
    in DDP and only rank 0 writes. ``run_config`` (when given) is saved so ``qatlab eval`` and
    ``qatlab ptq`` can rebuild the model from the checkpoint alone.
    """
    cfg = dataclasses.replace(cfg).validate()
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / "ckpt.pt" if run_dir is not None else None
    resuming = resume and ckpt_path is not None and ckpt_path.exists()
    if run_dir is not None and not resume:
        check_run_dir(run_dir)
    ckpt = load_checkpoint(ckpt_path) if resuming else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, run_config, ckpt_path)

    dev = distributed.setup(cfg.device)
    hooks = list(hooks)
    log = None
    try:
        model.to(dev.device)
        for hook in hooks:
            if isinstance(hook, nn.Module):
                hook.to(dev.device)
        seed_everything(cfg.seed)

        def loader(epoch: int):
            return train_loader(data, cfg, epoch, dev.rank, dev.world_size)

        steps_per_epoch = count_steps(data, cfg, dev.world_size)
        total_steps = cfg.epochs * steps_per_epoch
        base = make_optimizer(model, cfg)
        for group in base.param_groups:
            group["initial_lr"] = group["lr"]
        optimizer = base
        for hook in hooks:
            optimizer = hook.wrap_optimizer(optimizer, model)
        net = model
        if dev.enabled:
            ids = [dev.device.index] if dev.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        state = {
            "epoch": 0,
            "step": 0,
            "best": None,
            "best_epoch": 0,
            "bad_epochs": 0,
            "elapsed": 0.0,
            "stopped_early": False,
        }
        metric, mode = cfg.early_stop_metric, cfg.mode
        records: list[dict[str, Any]] = []
        best_state = None
        if ckpt is not None:
            load_model_state(model, ckpt["model"], ckpt_path)
            optimizer.load_state_dict(ckpt["optimizer"])  # outermost: wrapper state too
            for group in base.param_groups:  # the schedule sets lr from initial_lr every step
                group.setdefault("initial_lr", group["lr"])
            for hook, hook_state in zip(hooks, ckpt["hooks"], strict=True):
                hook.load_state_dict(hook_state)
            state.update({k: ckpt[k] for k in state if k in ckpt})
            best_path = run_dir / "best.pt"
            if cfg.restore_best and best_path.exists():
                best_state = load_checkpoint(best_path)["model"]
            records = [
                r
                for r in read_jsonl(run_dir / "metrics.jsonl")
                if "val_loss" in r and r.get("epoch", 0) <= state["epoch"]
            ]
            set_rng_state(ckpt["rng"])
        else:  # epoch 0: where training starts, and a check that the early-stop metric exists
            record = {"epoch": 0, "step": 0, **_eval(model, data, cfg, hooks, "val", 0)}
            names = set(record) | {"train_loss", "train_acc"}
            if metric not in names:
                raise ConfigError(
                    f"train.early_stop_metric {metric!r} is not a logged metric; choose one of "
                    + ", ".join(sorted(n for n in names if n not in ("epoch", "step")))
                )
            records.append(record)

        if run_dir is not None and dev.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if run_config is not None:
                from qatlab.train.config import write_yaml

                write_yaml(run_config.to_dict(), run_dir / "config.yaml")
            log = MetricsLog(
                run_dir / "metrics.jsonl", keep_epochs=state["epoch"] if ckpt is not None else None
            )
            if ckpt is None:
                log.write(records[0])
        if verbose and dev.is_main and ckpt is None:
            print(_line(records[0], cfg.epochs), flush=True)
        if verbose and dev.is_main and ckpt is not None:
            print(f"resumed from {ckpt_path} after epoch {state['epoch']}", flush=True)

        meta = _meta(model, data, run_config)
        loss_hooks = [h for h in hooks if type(h).loss_term is not Hook.loss_term]
        step_hooks = [h for h in hooks if type(h).after_step is not Hook.after_step]
        show_bar = cfg.progress and dev.is_main and sys.stderr.isatty()
        step = state["step"]
        epoch = state["epoch"]
        while epoch < cfg.epochs and not state["stopped_early"]:
            epoch += 1
            start = time.perf_counter()
            net.train()
            sums = torch.zeros(3, dtype=torch.float64, device=dev.device)  # loss, correct, n
            bar = _bar(show_bar, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
            try:
                for x, y in loader(epoch - 1):
                    x = x.to(dev.device, non_blocking=True)
                    y = y.to(dev.device, non_blocking=True)
                    factor = lr_factor(cfg, step, steps_per_epoch, total_steps)
                    for group in base.param_groups:
                        group["lr"] = group["initial_lr"] * factor
                    first: list = []

                    def closure(x=x, y=y, step=step, first=first):
                        base.zero_grad(set_to_none=True)
                        out = net(x)
                        loss = F.cross_entropy(out, y)
                        if not first:  # the first pass of a multi-pass step is what we log
                            first.append((loss.detach(), out.detach()))
                        total = loss
                        for hook in loss_hooks:
                            term = hook.loss_term(model, step, total_steps)
                            if term is not None:
                                total = total + term
                        total.backward()
                        return total

                    optimizer.step(closure)
                    loss, out = first[0]
                    sums[0] += loss * len(y)
                    sums[1] += (out.argmax(1) == y).sum()
                    sums[2] += len(y)
                    logged: dict[str, Any] = {}
                    for hook in step_hooks:
                        logged.update(hook.after_step(model, step, total_steps) or {})
                    step += 1
                    if cfg.log_every and step % cfg.log_every == 0:
                        logged.update(train_loss_step=float(loss), lr=factor * cfg.lr)
                    if logged and log is not None:
                        log.write({"epoch": epoch, "step": step, **_numbers(logged)})
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0:
                            bar.set_postfix(loss=f"{float(loss):.4f}")
            finally:
                if bar is not None:
                    bar.close()
            distributed.all_reduce_sum(sums, dev)
            distributed.sync_buffers(model, dev)
            record = {
                "epoch": epoch,
                "step": step,
                "lr": lr_factor(cfg, step - 1, steps_per_epoch, total_steps) * cfg.lr,
                "train_loss": float(sums[0] / sums[2]),
                "train_acc": float(sums[1] / sums[2]),
                **_eval(model, data, cfg, hooks, "val", epoch),
            }
            state["elapsed"] += time.perf_counter() - start
            record["time_s"] = round(time.perf_counter() - start, 3)
            records.append(record)
            value = record.get(metric)
            if _improved(value, state["best"], mode):
                state.update(best=value, best_epoch=epoch, bad_epochs=0)
                if cfg.restore_best or run_dir is not None:
                    best_state = _cpu_copy(model.state_dict())
                if run_dir is not None and dev.is_main:
                    save_checkpoint(
                        run_dir / "best.pt",
                        {"model": best_state, "epoch": epoch, "metrics": record, **meta},
                    )
            else:
                state["bad_epochs"] += 1
            if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
                state["stopped_early"] = True
            state.update(epoch=epoch, step=step)
            if log is not None:
                log.write(record)
                log.flush()
            if run_dir is not None and dev.is_main:
                save_checkpoint(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "hooks": [h.state_dict() for h in hooks],
                        **state,
                        "rng": rng_state(),
                        "train": dataclasses.asdict(cfg),
                        **meta,
                    },
                )
            distributed.barrier(dev)
            if verbose and dev.is_main:
                print(_line(record, cfg.epochs), flush=True)

        final_epoch = epoch
        if cfg.restore_best and best_state is not None and state["best_epoch"] != epoch:
            model.load_state_dict(best_state)
            final_epoch = state["best_epoch"]
        chosen = next((r for r in records if r["epoch"] == final_epoch), {})
        summary = {
            "name": run_config.name if run_config is not None else None,
            "epochs_run": epoch,
            "steps": step,
            "stopped_early": state["stopped_early"],
            "best_metric": metric,
            "best_value": state["best"],
            "best_epoch": state["best_epoch"],
            "final_epoch": final_epoch,
            **{k: v for k, v in chosen.items() if k.startswith("val_")},
            **_eval(model, data, cfg, hooks, "test", None),
        }
        train_eval = evaluate(model, data.train_eval, cfg.eval_batch_size)
        summary.update(train_eval_loss=train_eval["loss"], train_eval_acc=train_eval["acc"])
        summary["wall_time_s"] = round(state["elapsed"], 3)
        summary["config"] = (
            run_config.to_dict() if run_config is not None else {"train": dataclasses.asdict(cfg)}
        )
        if run_dir is not None and dev.is_main:
            log.close()
            write_json(run_dir / "summary.json", summary)
            from qatlab.train.plots import plot_curves

            plot_curves(
                read_jsonl(run_dir / "metrics.jsonl"),
                run_dir / "curves.png",
                title=summary["name"] or "",
            )
        if verbose and dev.is_main:
            print(
                f"test acc {summary['test_acc']:.4f} loss {summary['test_loss']:.4f} "
                f"(epoch {final_epoch}; {summary['wall_time_s']:.1f}s training)",
                flush=True,
            )
        return summary
    finally:
        if log is not None:
            log.close()
        distributed.teardown(dev)


def train_loader(data, cfg: TrainConfig, epoch: int, rank: int = 0, world_size: int = 1):
    """The shuffled training batches of one epoch (0-based), a pure function of seed and epoch."""
    from qatlab.data import make_loader

    return make_loader(
        data.train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=epoch,
        drop_last=True,
        rank=rank,
        world_size=world_size,
    )


def count_steps(data, cfg: TrainConfig, world_size: int | None = None) -> int:
    """Optimizer steps per epoch (``world_size`` defaults to ``$WORLD_SIZE`` or 1)."""
    if world_size is None:
        world_size = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    steps = len(train_loader(data, cfg, 0, 0, world_size))
    if steps == 0:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is larger than the training set "
            f"({len(data.train)} samples over {world_size} process(es)); lower --batch-size"
        )
    return steps


def check_run_dir(run_dir: Path) -> None:
    """A fresh run never writes into a folder that already holds one."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing:
        raise ConfigError(
            f"{run_dir} already holds a run ({existing[0]}); pass --resume to continue it, "
            "or choose another --name / --out-dir"
        )


# ----------------------------------------------------------------------------- helpers
def _eval(
    model: nn.Module, data, cfg: TrainConfig, hooks: Sequence[Hook], split: str, epoch: int | None
) -> dict[str, float]:
    """``{split}_loss``, ``{split}_acc`` and the hooks' eval metrics (BN re-estimated first
    if ``cfg.bn_reestimate``; ``epoch=None`` keeps the statistics the model has)."""
    from qatlab.data import make_loader

    if cfg.bn_reestimate and epoch is not None:
        batches = make_loader(
            data.train_eval,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=10_000 + epoch,
            drop_last=True,
        )
        reestimate_bn(model, batches, cfg.bn_batches)
    dataset = getattr(data, split)
    out = {}
    if dataset is not None and len(dataset) > 0:
        res = evaluate(model, dataset, cfg.eval_batch_size)
        out = {f"{split}_loss": res["loss"], f"{split}_acc": res["acc"]}
    for hook in hooks:
        extra = hook.eval_metrics(model, data, split) or {}
        out.update({f"{split}_{k}": v for k, v in _numbers(extra).items()})
    return out


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in state.items()
    }


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
        for k, v in metrics.items()
    }


def _improved(value: Any, best: Any, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _meta(model: nn.Module, data, run_config: RunConfig | None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild its model without the code that trained it."""
    if run_config is None:
        return {"model_spec": None, "quant": None, "config": None}
    return {
        "model_spec": {
            "name": run_config.model.name,
            "kwargs": dict(run_config.model.kwargs),
            "num_classes": int(data.num_classes),
            "input_shape": [int(d) for d in data.input_shape],
        },
        "quant": None if run_config.quant is None else run_config.quant.to_dict(),
        "config": run_config.to_dict(),
    }


def _check_resumable(
    ckpt: dict, cfg: TrainConfig, run_config: RunConfig | None, path: Path
) -> None:
    """Resuming with different settings would not continue the same run: refuse."""
    saved = ckpt.get("train") or {}
    now = dataclasses.asdict(cfg)
    for key, value in now.items():
        if key not in RESUMABLE and key in saved and saved[key] != value:
            raise ConfigError(
                f"cannot resume {path}: train.{key} was {saved[key]!r}, now {value!r}; "
                "resume with the run's own settings (or start a new --name)"
            )
    old = ckpt.get("config")
    if run_config is not None and old is not None:
        new = run_config.to_dict()
        for section in ("data", "model", "quant", "method"):
            if old.get(section) != new.get(section):
                raise ConfigError(
                    f"cannot resume {path}: its {section} settings differ from this run's; "
                    "resume with the run's own settings (or start a new --name)"
                )


def _bar(show: bool, total: int, desc: str):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}")
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}")
    if "time_s" in record:
        parts.append(f"{record['time_s']:.1f}s")
    return " | ".join(parts)
