"""The training loop: :func:`fit` (with hooks, checkpoints, resume, early stopping) and
:func:`evaluate`.

One step is ``loss = optimizer.step(closure)``; the closure zeroes the gradients, runs the
forward pass, adds every hook's loss term and back-propagates (see :mod:`qatlab.train.hooks`).
The learning rate is a pure function of the global step, so a resumed run follows exactly the
schedule of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qatlab.errors import CheckpointError, ConfigError, TrainingDiverged
from qatlab.measure.accuracy import evaluate
from qatlab.methods.base import Hook
from qatlab.quant import TransitionCounter, is_quantized, reestimate_bn
from qatlab.train import distributed
from qatlab.train.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_deterministic,
    set_rng_state,
)
from qatlab.train.config import TrainConfig
from qatlab.train.metrics import MetricsLog, read_jsonl, write_json
from qatlab.train.optim import make_optimizer
from qatlab.train.rundir import claim_run_dir

if TYPE_CHECKING:
    from qatlab.data import DataBundle
    from qatlab.train.config import RunConfig

# train.* fields that may change when a run is resumed (everything else must match)
RESUMABLE = (
    "epochs",
    "device",
    "progress",
    "log_every",
    "eval_batch_size",
    "patience",
    "divergence_factor",
    "deterministic",
    "num_workers",
    "compile",
)
# steps between divergence checks (each a host sync, and a collective under torchrun) when
# train.log_every is 0; otherwise the check runs at every logging step
CHECK_EVERY = 50
INIT_FILE = "init.pt"  # the model's state dict at step 0 (qatlab.measure's 'init' bounds)


# ----------------------------------------------------------------------------- schedule
def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the initial LR at global ``step``: cosine from 1 to ``min_lr`` or constant."""
    if cfg.schedule == "constant":
        return 1.0
    t = step if cfg.schedule_per == "step" else (step // steps_per_epoch) * steps_per_epoch
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(t / max(total_steps, 1), 1.0)))
    return cfg.min_lr + (1.0 - cfg.min_lr) * cosine


# ----------------------------------------------------------------------------- one step
@dataclass
class StepOutput:
    """What one training step gives back: the first pass's task loss and logits (detached),
    and the metrics the hooks' ``after_step`` returned."""

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, Any]


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: Any,
    hooks: Sequence[Hook] = (),
    step: int = 0,
    total_steps: int = 1,
    *,
    net: nn.Module | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> StepOutput:
    """One optimizer step with every hook: loss terms, optimizer wrappers, after-step callbacks.

    ``optimizer`` is the (possibly wrapped) optimizer; it calls the closure once or more (a
    two-pass wrapper twice); the first pass is what is returned. ``net`` is what runs the
    forward pass (a DDP wrapper of ``model``); hooks always see the bare ``model``. The
    caller sets the learning rate in ``optimizer.param_groups`` beforehand (the loop owns it).
    """
    net = model if net is None else net
    first: list[tuple[torch.Tensor, torch.Tensor]] = []

    def closure(sync: bool = True) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(net, "no_sync", None)
        with contextlib.nullcontext() if sync or no_sync is None else no_sync():
            out = net(x)
            loss = loss_fn(out, y)
            if not first:
                first.append((loss.detach(), out.detach()))
            total = loss
            for hook in hooks:
                term = hook.loss_term(model, step, total_steps)
                if term is not None:
                    total = total + term
            total.backward()
        return total

    optimizer.step(closure)
    metrics: dict[str, Any] = {}
    for hook in hooks:
        metrics.update(hook.after_step(model, step, total_steps) or {})
    loss, logits = first[0]
    return StepOutput(loss, logits, metrics)


def build_optimizer(model: nn.Module, cfg: TrainConfig, hooks: Sequence[Hook] = ()) -> Any:
    """``make_optimizer`` with ``initial_lr`` in every group, wrapped by each hook in order."""
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    for hook in hooks:
        optimizer = hook.wrap_optimizer(optimizer, model)
    return optimizer


def transition_counter(model: nn.Module, hooks: Sequence[Hook] = ()) -> TransitionCounter | None:
    """The counter behind the ``tr`` log: a hook's own (``hook.transitions``) when it has one,
    so transitions are computed once per step; a new one otherwise; None for a float model."""
    if not is_quantized(model):
        return None
    for hook in hooks:
        counter = getattr(hook, "transitions", None)
        if isinstance(counter, TransitionCounter):
            return counter
    return TransitionCounter(model)


def compiled(
    net: nn.Module, model: nn.Module, hooks: Sequence[Hook] = (), verbose: bool = False
) -> nn.Module:
    """``torch.compile(net)`` for the training forward and backward (``train.compile``).

    ``model`` (the bare module) keeps owning the parameters and state dicts, so checkpoints
    hold no ``_orig_mod.`` prefixes and a compiled run resumes into an eager one and back.
    A hook with ``eager_only = True`` (a method whose forward pass the compiler cannot
    follow) keeps the whole run eager, said in one line. The first step compiles; its time
    is logged as ``compile_s``.
    """
    eager = sorted({type(h).__name__ for h in hooks if getattr(h, "eager_only", False)})
    if eager:
        if verbose:
            print(f"train.compile: {', '.join(eager)} runs eager only; not compiling", flush=True)
        return net
    for module in model.modules():  # settle lazily read flags now, not inside the graph
        settle = getattr(module, "settle", None)
        if callable(settle):
            settle()
    net = torch.compile(net)
    net._qatlab_compile_pending = True
    return net


def uncompiled(model: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper (``model`` itself if not compiled)."""
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- fit
@dataclass
class TrainState:
    """Counters of a run, saved in ``ckpt.pt`` (at its top level)."""

    epoch: int = 0
    step: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    elapsed: float = 0.0
    stopped_early: bool = False
    first_loss: float | None = None  # the first step's loss: the scale divergence is judged by


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

    Every epoch: train (:func:`train_step` per batch), (re-estimate BN), evaluate on
    ``data.val`` plus the hooks' eval metrics, keep the best ``cfg.early_stop_metric``
    (``best.pt``), write ``ckpt.pt`` atomically, append to ``metrics.jsonl``; a fresh run
    first saves its step-0 weights as ``init.pt``. ``resume=True``
    continues from ``ckpt.pt`` and ends with exactly the weights of an uninterrupted run. A
    non-finite or exploding loss raises :class:`qatlab.errors.TrainingDiverged` before
    anything of that epoch is saved. Under torchrun the model is wrapped in DDP and only rank 0
    writes. ``run_config`` (when given) is saved so ``qatlab eval``/``ptq`` can rebuild the
    model from the checkpoint alone.
    """
    cfg = dataclasses.replace(cfg).validate()
    model = uncompiled(model)  # state dicts are the bare module's (no ``_orig_mod.`` keys)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir of the run to continue")
    run_claim = contextlib.ExitStack()  # run_dir is ours until fit returns (qatlab.train.rundir)
    dev = distributed.setup(cfg.device)
    set_deterministic(cfg.deterministic, dev.device)
    hooks = list(hooks)
    log = None
    try:
        ckpt = None
        if run_dir is not None and run_claim.enter_context(claim_run_dir(run_dir, resume=resume)):
            ckpt = load_checkpoint(run_dir / "ckpt.pt")
            _check_resumable(ckpt, cfg, run_config, run_dir / "ckpt.pt")
        model.to(dev.device)
        for hook in hooks:
            if isinstance(hook, nn.Module):
                hook.to(dev.device)
        seed_everything(cfg.seed)
        steps_per_epoch = count_steps(data, cfg, dev.world_size)
        total_steps = cfg.epochs * steps_per_epoch
        optimizer = build_optimizer(model, cfg, hooks)
        net = distributed.wrap_model(model, dev)
        if cfg.compile:
            net = compiled(net, model, hooks, verbose=verbose and dev.is_main)
        state, best_state = TrainState(), None
        if ckpt is None:
            records = [_start_record(model, data, cfg, hooks)]
        else:
            records, best_state = _restore(ckpt, model, optimizer, hooks, state, run_dir, cfg)
        counter = transition_counter(model, hooks) if cfg.log_transitions else None
        if run_dir is not None and dev.is_main:
            log = _open_log(run_dir, run_config, records, state.epoch if ckpt else None)
        meta = _meta(model, data, run_config)
        if ckpt is None and run_dir is not None and dev.is_main:
            # the weights at step 0 (after quantization and calibration): what the PAC-Bayes
            # 'init' bounds of qatlab.measure measure the distance travelled from
            init = {"model": _cpu_copy(model.state_dict()), "epoch": 0, **meta}
            save_checkpoint(run_dir / INIT_FILE, init)
        if verbose and dev.is_main:
            resumed = f"resumed from {run_dir / 'ckpt.pt'} after epoch {state.epoch}"
            print(resumed if ckpt else _line(records[0], cfg.epochs), flush=True)

        metric, mode = cfg.early_stop_metric, cfg.mode
        while state.epoch < cfg.epochs and not state.stopped_early:
            start = time.perf_counter()
            epoch = state.epoch + 1
            record = _train_epoch(
                model, net, data, cfg, optimizer, hooks, counter, state, log, dev, total_steps
            )
            record.update(_eval(model, data, cfg, hooks, "val", epoch))
            # every rank decides from rank 0's numbers (stop, best, divergence): ranks that
            # disagreed would leave the others waiting in a collective
            record = distributed.broadcast_object(record, dev)
            state.elapsed += time.perf_counter() - start
            record["time_s"] = round(time.perf_counter() - start, 3)
            records.append(record)
            if log is not None:
                log.write(record)
                log.flush()
            _check_divergence(record, state, cfg)
            if _improved(record.get(metric), state.best, mode):
                state.best, state.best_epoch, state.bad_epochs = record[metric], epoch, 0
                if cfg.restore_best or run_dir is not None:
                    best_state = _cpu_copy(model.state_dict())
                if run_dir is not None and dev.is_main:
                    best = {"model": best_state, "epoch": epoch, "metrics": record, **meta}
                    save_checkpoint(run_dir / "best.pt", best)
            else:
                state.bad_epochs += 1
            state.stopped_early = cfg.patience is not None and state.bad_epochs >= cfg.patience
            state.epoch = epoch
            if run_dir is not None and dev.is_main:
                save_checkpoint(
                    run_dir / "ckpt.pt",
                    _train_checkpoint(model, optimizer, hooks, state, cfg, meta),
                )
            distributed.barrier(dev)
            if verbose and dev.is_main:
                print(_line(record, cfg.epochs), flush=True)

        summary = _summary(model, data, cfg, hooks, state, records, best_state, run_config)
        if run_dir is not None and dev.is_main:
            log.close()
            write_json(run_dir / "summary.json", summary)
            from qatlab.train.plots import plot_curves

            records = read_jsonl(run_dir / "metrics.jsonl")
            plot_curves(records, run_dir / "curves.png", title=summary["name"] or "")
        if verbose and dev.is_main:
            print(
                f"test acc {summary['test_acc']:.4f} loss {summary['test_loss']:.4f} "
                f"(epoch {summary['final_epoch']}; {summary['wall_time_s']:.1f}s training)",
                flush=True,
            )
        return summary
    finally:
        if log is not None:
            log.close()
        distributed.teardown(dev)
        run_claim.close()


def _train_epoch(
    model: nn.Module,
    net: nn.Module,
    data,
    cfg: TrainConfig,
    optimizer: Any,
    hooks: Sequence[Hook],
    counter: TransitionCounter | None,
    state: TrainState,
    log: MetricsLog | None,
    dev: distributed.Dist,
    total_steps: int,
) -> dict[str, Any]:
    """One epoch of :func:`train_step`; returns the epoch record's training part (loss,
    accuracy, LR and, for a quantized model, the mean transition rate ``tr`` and ``tr/<layer>``).

    No host-device sync between logging steps: running sums stay on the device, and the
    divergence check (a sync, plus an all-reduce under torchrun so every rank stops at the same
    step) runs every ``cfg.log_every`` steps (:data:`CHECK_EVERY` if 0) and at the epoch end."""
    epoch = state.epoch + 1
    steps_per_epoch = total_steps // cfg.epochs
    net.train()
    sums = torch.zeros(3, dtype=torch.float64, device=dev.device)  # loss, correct, n
    changed: dict[str, torch.Tensor] = {}  # per layer, summed over the epoch (no host sync)
    show_bar = cfg.progress and dev.is_main and sys.stderr.isatty()
    bar = _bar(show_bar, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
    check_every = cfg.log_every or CHECK_EVERY
    first: torch.Tensor | None = None  # the run's first loss, read at the first check
    loader = train_loader(data, cfg, epoch - 1, dev.rank, dev.world_size, dev.device)
    compile_s = None  # a compiled net compiles in its first step (of this process)
    try:
        for x, y in loader:
            x = x.to(dev.device, non_blocking=True)
            y = y.to(dev.device, non_blocking=True)
            factor = lr_factor(cfg, state.step, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:  # the loop owns the LR (methods.base, rule 1)
                group["lr"] = group["initial_lr"] * factor
            first_compiled = getattr(net, "_qatlab_compile_pending", False)
            t0 = time.perf_counter()
            out = train_step(model, x, y, optimizer, hooks, state.step, total_steps, net=net)
            if first_compiled:
                net._qatlab_compile_pending = False
                compile_s = time.perf_counter() - t0
            sums[0] += out.loss * len(y)
            sums[1] += (out.logits.argmax(1) == y).sum()
            sums[2] += len(y)
            logged = out.metrics
            if counter is not None:
                moves = counter.update(model, state.step)
                for name, d in moves.direction.items():
                    moved = torch.count_nonzero(d)
                    changed[name] = changed[name] + moved if name in changed else moved
            if state.first_loss is None and first is None:
                first = out.loss.detach().clone()
            state.step += 1
            if cfg.log_every and state.step % cfg.log_every == 0:
                logged = {**logged, "train_loss_step": float(out.loss), "lr": factor * cfg.lr}
                if counter is not None:
                    logged.update(moves.metrics())
            if logged and log is not None:
                log.write({"epoch": epoch, "step": state.step, **_numbers(logged)})
            if state.step % check_every == 0:
                loss = _running_loss(sums, first, state, dev)
                _check_divergence({"train_loss": loss}, state, cfg)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _agree_first_loss(first, state, dev)
    distributed.all_reduce_sum(sums, dev)
    distributed.sync_buffers(model, dev)
    record = {
        "epoch": epoch,
        "step": state.step,
        "lr": lr_factor(cfg, state.step - 1, steps_per_epoch, total_steps) * cfg.lr,
        "train_loss": float(sums[0] / sums[2]),
        "train_acc": float(sums[1] / sums[2]),
    }
    if compile_s is not None:
        record["compile_s"] = round(compile_s, 3)  # the first step, compilation included
    if changed:
        sizes = {n: counter.previous(n).numel() for n in changed}
        counts = {n: int(c) for n, c in changed.items()}
        record["tr"] = sum(counts.values()) / (max(sum(sizes.values()), 1) * steps_per_epoch)
        record.update({f"tr/{n}": c / (sizes[n] * steps_per_epoch) for n, c in counts.items()})
    return record


def _agree_first_loss(first: torch.Tensor | None, state: TrainState, dev) -> None:
    """Set ``state.first_loss`` (the scale divergence is judged by) from the first step's loss,
    averaged over ranks so every rank judges by the same number."""
    if state.first_loss is not None or first is None:
        return
    total = distributed.all_reduce_sum(first.detach().double().reshape(1), dev)
    state.first_loss = float(total) / dev.world_size


def _running_loss(sums: torch.Tensor, first: torch.Tensor | None, state: TrainState, dev) -> float:
    """The epoch's mean training loss so far over all ranks (one sync; a collective under
    torchrun, which every rank reaches at the same step)."""
    _agree_first_loss(first, state, dev)
    both = distributed.all_reduce_sum(torch.stack([sums[0], sums[2]]), dev)
    return float(both[0] / both[1])


def _check_divergence(record: dict[str, Any], state: TrainState, cfg: TrainConfig) -> None:
    """Raise TrainingDiverged if the training loss is not finite, or (``divergence_factor``)
    more than that many times the first step's loss."""
    loss = record.get("train_loss")
    if loss is None:
        return
    exploded = (
        cfg.divergence_factor
        and state.first_loss is not None
        and loss > cfg.divergence_factor * max(state.first_loss, 1.0)
    )
    if math.isfinite(loss) and not exploded:
        return
    what = (
        "not finite"
        if not math.isfinite(loss)
        else f"{loss:.3g}, {loss / state.first_loss:.0f}x the first step's"
    )
    raise TrainingDiverged(
        f"training diverged in epoch {state.epoch + 1} (step {state.step}): the training loss "
        f"is {what}; nothing of this epoch was saved; lower train.lr (now {cfg.lr:g})"
    )


def _start_record(model: nn.Module, data, cfg: TrainConfig, hooks: Sequence[Hook]) -> dict:
    """The epoch-0 record (where training starts), and a check that the early-stopping metric
    is one that gets logged."""
    record = {"epoch": 0, "step": 0, **_eval(model, data, cfg, hooks, "val", 0)}
    names = set(record) | {"train_loss", "train_acc"}
    if cfg.early_stop_metric not in names:
        raise ConfigError(
            f"train.early_stop_metric {cfg.early_stop_metric!r} is not a logged metric; choose "
            "one of " + ", ".join(sorted(n for n in names if n not in ("epoch", "step")))
        )
    return record


def _restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: Any,
    hooks: Sequence[Hook],
    state: TrainState,
    run_dir: Path,
    cfg: TrainConfig,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Load model, optimizer (wrappers included), hooks, counters and RNG states from
    ``ckpt``; return the epoch records logged so far and the best weights."""
    load_model_state(model, ckpt["model"], run_dir / "ckpt.pt")
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the schedule sets lr from initial_lr every step
        group.setdefault("initial_lr", group["lr"])
    if len(hooks) != len(ckpt["hooks"]):
        raise CheckpointError(
            f"cannot resume {run_dir}: its checkpoint holds {len(ckpt['hooks'])} method hook "
            f"states but this run has {len(hooks)} hooks; resume with the run's own method"
        )
    for hook, hook_state in zip(hooks, ckpt["hooks"], strict=True):
        hook.load_state_dict(hook_state)
    for f in dataclasses.fields(state):
        if f.name in ckpt:
            setattr(state, f.name, ckpt[f.name])
    best_state = None
    if cfg.restore_best and (run_dir / "best.pt").exists():
        best_state = load_checkpoint(run_dir / "best.pt")["model"]
    records = [
        r
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "val_loss" in r and r.get("epoch", 0) <= state.epoch
    ]
    set_rng_state(ckpt["rng"])
    return records, best_state


def _open_log(
    run_dir: Path, run_config: RunConfig | None, records: list[dict], keep_epochs: int | None
) -> MetricsLog:
    """Write ``config.yaml`` and open ``metrics.jsonl`` (a fresh run logs its epoch 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_config is not None:
        from qatlab.train.config import write_yaml

        write_yaml(run_config.to_dict(), run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", keep_epochs=keep_epochs)
    if keep_epochs is None:
        log.write(records[0])
    return log


def _train_checkpoint(
    model: nn.Module,
    optimizer: Any,
    hooks: Sequence[Hook],
    state: TrainState,
    cfg: TrainConfig,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Everything ``--resume`` needs: the outermost optimizer's state (wrappers nest theirs),
    hook states, counters, RNG states and the training settings."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "hooks": [h.state_dict() for h in hooks],
        **dataclasses.asdict(state),
        "rng": rng_state(),
        "train": dataclasses.asdict(cfg),
        **meta,
    }


def _summary(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    hooks: Sequence[Hook],
    state: TrainState,
    records: list[dict[str, Any]],
    best_state: dict[str, Any] | None,
    run_config: RunConfig | None,
) -> dict[str, Any]:
    """End with the best weights (``restore_best``), then test and train-eval accuracy."""
    final_epoch = state.epoch
    if cfg.restore_best and best_state is not None and state.best_epoch != state.epoch:
        model.load_state_dict(best_state)
        final_epoch = state.best_epoch
    chosen = next((r for r in records if r["epoch"] == final_epoch), {})
    summary = {
        "name": run_config.name if run_config is not None else None,
        "epochs_run": state.epoch,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "best_metric": cfg.early_stop_metric,
        "best_value": state.best,
        "best_epoch": state.best_epoch,
        "final_epoch": final_epoch,
        **{k: v for k, v in chosen.items() if k.startswith("val_")},
        **_eval(model, data, cfg, hooks, "test", None),
    }
    train_eval = evaluate(model, data.train_eval, cfg.eval_batch_size)
    summary.update(train_eval_loss=train_eval["loss"], train_eval_acc=train_eval["acc"])
    summary["wall_time_s"] = round(state.elapsed, 3)
    summary["config"] = (
        run_config.to_dict() if run_config is not None else {"train": dataclasses.asdict(cfg)}
    )
    return summary


def train_loader(
    data,
    cfg: TrainConfig,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
):
    """The shuffled training batches of one epoch (0-based), a pure function of seed and epoch.

    On a CUDA ``device`` batches of in-memory data are gathered and augmented on the GPU
    (same numbers as on the CPU); item-wise datasets are read by ``cfg.num_workers`` workers
    (default up to 4) into pinned memory. Elsewhere: as before, in the training thread."""
    from qatlab.data import make_loader

    cuda = device is not None and torch.device(device).type == "cuda"
    workers = cfg.num_workers
    if workers is None:
        workers = min(4, max((os.cpu_count() or 1) // max(world_size, 1), 1)) if cuda else 0
    return make_loader(
        data.train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=epoch,
        drop_last=True,
        rank=rank,
        world_size=world_size,
        device=device if cuda else None,
        num_workers=workers,
        pin_memory=cuda,
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
    if "compile_s" in record:
        parts.append(f"compile {record['compile_s']:.1f}s")
    return " | ".join(parts)
