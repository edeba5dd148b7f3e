"""Optimizers of a run: weights, weight step sizes and activation step sizes in their groups.

:func:`make_optimizer` builds them from a :class:`~qatlab.train.config.TrainConfig`;
:class:`OptimizerPair` steps several as one; :class:`LogAdam` is Adam on ``log s``, the
from-scratch default for LSQ step sizes (docs/results/qat_recipe.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from qatlab.errors import ConfigError
from qatlab.quant import Quantizer
from qatlab.train.config import TrainConfig


class LogAdam(torch.optim.Optimizer):
    """Adam on ``log p`` for positive parameters (quantizer step sizes): scale-free updates.

    Plain Adam moves a parameter by about ``lr`` per update whatever its size, so at the
    weights' LR a step size of ~1e-2 can be driven to zero in a few dozen updates (dead
    networks), while at 1e-5 it cannot follow weights that grow several-fold from scratch.
    Here the moments are those of ``d loss / d log p = p * grad`` and the update is
    multiplicative, ``p <- p * exp(-lr * m_hat / (sqrt(v_hat) + eps))``: each update changes
    ``p`` by at most about a fraction ``lr``, it stays positive, and the same LR suits a step of
    1e-3 or of 1. (TQT, Jain et al. 2020, trains log2 thresholds for the same reason.) Groups
    with ``log=False`` (LSQ+ offsets, which may be negative) get plain Adam.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        log: bool = True,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "log": log})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter with a gradient, a group at a time with
        ``torch._foreach_*`` ops (one launch per op for the whole group on CUDA, not ~10 per
        parameter); the same elementwise ops as a per-parameter loop, so the numbers are too."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            if group["log"]:
                grads = torch._foreach_mul(grads, params)  # d loss / d log p = p * grad
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1  # a Python int: no tensor, no sync
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avgs, denom)
            torch._foreach_mul_(update, [group["lr"] / (1 - beta1**t) for t in steps])
            if group["log"]:
                torch._foreach_neg_(update)
                torch._foreach_exp_(update)
                torch._foreach_mul_(params, update)
            else:
                torch._foreach_sub_(params, update)
        return loss


class OptimizerPair:
    """Several optimizers stepped as one (e.g. SGD for weights, Adam for step sizes, as Nagel).

    Exposes what the loop and optimizer wrappers use: ``param_groups`` (all), ``zero_grad``,
    ``step(closure)`` (closure runs once), ``state_dict``/``load_state_dict``.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

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


def quantizer_parameters(model: nn.Module, role: str | None = None) -> list[nn.Parameter]:
    """Learned quantizer parameters (LSQ step sizes and offsets) of ``model``; ``role``
    ``"weight"`` or ``"input"`` keeps those of weight or activation quantizers only."""
    return [
        p
        for m in model.modules()
        if isinstance(m, Quantizer) and (role is None or m.role == role)
        for p in m.parameters()
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    """The optimizer of ``cfg``: weights in one group; weight step sizes in another
    (``cfg.quant_optimizer`` at ``cfg.quant_lr``, no weight decay) and activation step sizes in
    a third (``cfg.act_quant_*``, None = as the weight steps). Groups whose optimizer differs
    from the weights' get their own optimizer, stepped together (:class:`OptimizerPair`).
    ``"auto"`` step settings of a config that was never validated get the from-scratch recipe
    (``TrainConfig.validate``)."""
    if "auto" in (cfg.quant_optimizer, cfg.quant_lr, cfg.act_quant_optimizer, cfg.act_quant_lr):
        cfg = dataclasses.replace(cfg).validate()
    wsteps = {id(p) for p in quantizer_parameters(model, "weight")}
    asteps = {id(p) for p in quantizer_parameters(model)} - wsteps
    offsets = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    offsets -= {id(m.step) for m in model.modules() if isinstance(m, Quantizer)}
    params = [p for p in model.parameters() if p.requires_grad]
    quant_lr = cfg.resolve_lr(cfg.quant_lr) if cfg.quant_lr is not None else cfg.lr
    quant_opt = cfg.quant_optimizer or cfg.optimizer
    act_lr = cfg.resolve_lr(cfg.act_quant_lr) if cfg.act_quant_lr is not None else quant_lr
    act_opt = cfg.act_quant_optimizer or quant_opt
    groups = [
        (
            cfg.optimizer,
            [p for p in params if id(p) not in wsteps | asteps],
            cfg.lr,
            cfg.weight_decay,
        ),
        (quant_opt, [p for p in params if id(p) in wsteps], quant_lr, 0.0),
        (act_opt, [p for p in params if id(p) in asteps], act_lr, 0.0),
    ]
    by_optimizer: dict[str, list[dict]] = {}
    for name, members, lr, decay in groups:
        if not members and name != cfg.optimizer:
            continue
        if name == "logadam":  # offsets may be negative: plain Adam inside LogAdam
            steps = [p for p in members if id(p) not in offsets]
            split = (steps, [p for p in members if id(p) in offsets])
            for log, part in zip((True, False), split, strict=True):
                if part:
                    by_optimizer.setdefault(name, []).append({"params": part, "lr": lr, "log": log})
            continue
        by_optimizer.setdefault(name, []).append(
            {"params": members, "lr": lr, "weight_decay": decay}
        )
    optimizers = [_optimizer(name, g, cfg) for name, g in by_optimizer.items()]
    return optimizers[0] if len(optimizers) == 1 else OptimizerPair(*optimizers)


def optimizer(
    model: nn.Module,
    name: str = "adam",
    lr: float = 1e-3,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    fine_tune: bool = False,
    quant_optimizer: str | None = "auto",
    quant_lr: float | str | None = "auto",
    act_quant_optimizer: str | None = "auto",
    act_quant_lr: float | str | None = "auto",
) -> torch.optim.Optimizer | OptimizerPair:
    """The optimizer ``qatlab train`` would build for ``model``, for your own loop.

    The weights train with ``name`` (``adam``, ``adamw`` or ``sgd``) at ``lr``; the quantizer
    step sizes get their own groups and, when theirs differs, their own optimizer, stepped
    together with the weights' (:class:`OptimizerPair`: ``zero_grad``, ``step``,
    ``param_groups``, ``state_dict``). The step-size recipe is the trainer's
    (``qatlab.train.config.STEP_RECIPES``): from scratch (default) the weight steps train with
    Adam on ``log s`` (:class:`LogAdam`) at 5e-3 and the activation steps with Adam at 1e-5;
    ``fine_tune=True`` (starting from trained float weights) gives every step Adam at 1e-5.
    The ``quant_*`` arguments override the recipe as ``train.quant_*`` do (an LR may be
    ``"<k>x"``, k times ``lr``; None = as the weights). Step sizes trained at the weights'
    learning rate by the weights' optimizer can collapse to zero from scratch: this is why.
    (From scratch the trainer also starts the weight steps from LSQ's mean-abs init:
    ``QuantConfig(weight_init="meanabs")`` before :func:`qatlab.quantize`.)

    Every group records its ``initial_lr``, so a schedule is one line per step::

        for g in opt.param_groups: g["lr"] = g["initial_lr"] * factor
    """
    cfg = TrainConfig(
        optimizer=name,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        quant_optimizer=quant_optimizer,
        quant_lr=quant_lr,
        act_quant_optimizer=act_quant_optimizer,
        act_quant_lr=act_quant_lr,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"qatlab.optimizer(model, ...): model must be a torch.nn.Module, got "
            f"{type(model).__name__}"
        )
    opt = make_optimizer(model, cfg.apply_recipe(fine_tune).validate())
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def _optimizer(name: str, groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("train.nesterov needs train.momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "logadam":
        return LogAdam(groups, lr=cfg.lr)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)
