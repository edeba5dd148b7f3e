"""Transition-rate (TR) scheduling with a transition-adaptive learning rate (TALR).

Lee, Jeon, Kim, Ham, "Scheduling Weight Transitions for Quantization-Aware Training" (ICCV
2025, arXiv:2404.19248). The authors published no code; this module is written to be read
against the paper's equations (spec: METHODS.md §5).

A *transition* is a change of a quantized weight's integer level between two steps. The share
of the N counted weights that moved at step t is the transition rate::

    k_t = (1/N) * #{i : w_int_t(i) != w_int_{t-1}(i)}

How far the quantized model moves is set by ``k_t``, not by the learning rate: late in training
latent weights sit near transition points and keep flipping however small the LR is. TR
scheduling therefore schedules a *target* rate ``R_t`` and adapts the latent weights' LR so the
running rate follows it::

    K_t = m * K_{t-1} + (1 - m) * k_t             (running TR; m = 0.99, K_0 = 0)
    U_t = max(0, U_{t-1} + eta * (R_t - K_t))     (TALR, replaces the user LR; U_0 = eta)
    w  <- w - U_t * g_t                           (g_t: the base optimizer's direction)

``R_t`` goes from ``R_0 = lambda * sqrt(b_w)`` to 0 with a cosine (default), a step decay or
stays constant; ``eta`` (and ``U_0``) default to the plain optimizer's initial LR. Here ``U``
acts in step ``t`` and is then updated from that step's ``k_t`` for step ``t + 1``.

What TALR touches (choices where the paper is open are marked *qatlab*):

- **Latent weights of the counted layers** get ``U`` as their LR. Counted layers are the
  quantized layers not pinned to 8 bits by the first/last-layer policy (*qatlab*;
  ``include_pinned=True`` counts those too). Pinned layers, biases, norm layers and the
  activation step sizes keep the loop's (or your scheduler's) LR.
- **Weight step sizes of the counted layers are frozen** (the paper: otherwise a changing step
  makes transitions without any weight update). They get ``requires_grad = False`` when the
  hook is built: the parameters stay in the model and its ``state_dict``, so checkpoints load
  into a plain model as before, and an optimizer that holds them never moves them (no
  gradient, so no momentum or weight decay either). Activation step sizes train as usual.
- ``per_layer=True`` keeps one ``U``/``K`` per counted layer (each with its own ``R_0`` from
  its bit width); the default is one global ``U`` over all counted weights (*qatlab*: the
  paper's main setting is global).

Use in a plain PyTorch loop::

    from qatlab.methods.talr import TALRHook

    model = qatlab.quantize(net, qatlab.QuantConfig(weight_bits=2, act_bits=2))
    qatlab.calibrate(model, batches)
    talr = TALRHook(model, total_steps=epochs * len(loader), lam=5e-3)   # freezes weight steps
    optimizer = talr.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                    model)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()                              # latent weights move with U_t
        print(talr.after_step(model, step, total_steps))   # k_t, K_t, R_t, U_t every log_every

With the trainer: ``qatlab train --method talr --lambda 5e-3 --wbits 2 --abits 2 ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qatlab.errors import ConfigError
from qatlab.methods import register_method
from qatlab.methods.base import Hook, OptimizerWrapper
from qatlab.quant.layers import quant_layers
from qatlab.quant.transitions import TransitionCounter

SCHEDULES = ("cosine", "step", "constant")
GLOBAL = "all"  # the key of the single U when per_layer is False


# ----------------------------------------------------------------------------- target R_t
def target_rate(
    t: int,
    total_steps: int,
    r0: float,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """The target transition rate ``R_t`` at step ``t`` of ``total_steps``.

    - ``cosine``:   ``R_t = R_0 * (1 + cos(pi * t / T)) / 2``, from ``R_0`` to 0;
    - ``step``:     ``R_t = R_0 * gamma^j``, ``j`` = milestones (fractions of T) passed;
    - ``constant``: ``R_t = R_0``.
    """
    progress = min(max(t / max(total_steps, 1), 0.0), 1.0)
    if schedule == "cosine":
        return r0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return r0 * gamma ** sum(progress >= m for m in milestones)
    if schedule == "constant":
        return r0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


# ----------------------------------------------------------------------------- helpers
def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``optimizer`` (itself, an :class:`OptimizerPair`'s two, or
    those of a wrapped optimizer)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if hasattr(optimizer, "optimizers"):
        return [o for sub in optimizer.optimizers for o in torch_optimizers(sub)]
    if hasattr(optimizer, "base"):
        return torch_optimizers(optimizer.base)
    raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")


def split_groups(optimizer: Any, params: dict[str, list[nn.Parameter]]) -> list[dict]:
    """Move each parameter of ``params`` (``{key: [parameters]}``) out of its group into a new
    group of its own per (source group, key), marked ``group["talr"] = key``.

    The new groups copy every hyperparameter of their source group (``lr``, ``initial_lr``,
    momentum, betas, weight decay, ...), so the loop's schedule and the optimizer treat them
    as before until TALR sets their ``lr``. Must run before the optimizer has any state
    (per-parameter state is indexed by group order in ``state_dict``). Returns the new groups.
    """
    key_of = {id(p): key for key, ps in params.items() for p in ps}
    created: list[dict] = []
    for opt in torch_optimizers(optimizer):
        if any(len(s) for s in opt.state.values()):
            raise ValueError("wrap the optimizer with TALR before its first step")
        new = []
        for group in opt.param_groups:
            if "talr" in group:
                continue
            mine = [p for p in group["params"] if id(p) in key_of]
            if not mine:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in key_of]
            hyper = {k: v for k, v in group.items() if k != "params"}
            for key in params:  # in key order, so per-layer groups follow the layer order
                ps = [p for p in mine if key_of[id(p)] == key]
                if ps:
                    new.append({**hyper, "params": ps, "talr": key})
        for group in new:
            opt.add_param_group(group)
            created.append(opt.param_groups[-1])
    found = {id(p) for g in created for p in g["params"]}
    missing = [k for k, ps in params.items() if any(id(p) not in found for p in ps)]
    if missing:
        raise ValueError(f"TALR: the optimizer does not hold the latent weights of {missing}")
    return created


def freeze_weight_steps(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Stop the weight quantizers of layers ``names`` from learning (``requires_grad=False``);
    returns the frozen parameters."""
    layers = dict(quant_layers(model))
    frozen = []
    for name in names:
        for p in layers[name].weight_quantizer.parameters():
            p.requires_grad_(False)
            frozen.append(p)
    return frozen


# ----------------------------------------------------------------------------- the wrapper
class TALR(OptimizerWrapper):
    """Transition-adaptive LR around any torch optimizer (SGD, Adam, AdamW, ...).

    On construction the latent weights of the counted layers are split out of their parameter
    groups into TALR groups (one, or one per layer with ``per_layer``). Each ``step``:

    1. the TALR groups' ``lr`` is set to ``U_t`` (other groups keep the loop's ``lr``);
    2. the base optimizer steps (``closure`` as usual); the loop's ``lr`` is put back;
    3. ``k_t`` is read from ``counter.update(model, t)`` (shared with other users of the
       counter at the same step), then ``K_t``, ``R_t`` and ``U_{t+1}`` are updated
       (:meth:`observe`).

    ``eta`` and ``u0`` default (None or 0) to the TALR groups' initial LR (``initial_lr`` if
    the loop set it, else ``lr``). ``t`` counts this wrapper's steps from 0 and is saved in
    :meth:`wrapper_state`, so after a resume it equals the loop's global step.
    """

    def __init__(
        self,
        base: Any,
        model: nn.Module,
        total_steps: int,
        *,
        lam: float = 5e-3,
        momentum: float = 0.99,
        schedule: str = "cosine",
        per_layer: bool = False,
        eta: float | None = None,
        u0: float | None = None,
        counter: TransitionCounter | None = None,
        include_pinned: bool = False,
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
    ) -> None:
        super().__init__(base)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.model = model
        self.total_steps = total_steps
        self.lam, self.m, self.schedule = lam, momentum, schedule
        self.milestones, self.gamma = tuple(milestones), gamma
        self.per_layer = per_layer
        self.counter = counter or TransitionCounter(model, include_pinned=include_pinned)
        layers = dict(quant_layers(model))
        names = list(self.counter.layer_names)
        if not names:
            raise ValueError("TALR: the model has no quantized layers to schedule")
        self.keys = names if per_layer else [GLOBAL]
        params = {n if per_layer else GLOBAL: [] for n in names}
        for n in names:
            params[n if per_layer else GLOBAL].append(layers[n].weight)
        split_groups(base, params)
        freeze_weight_steps(model, names)  # idempotent (the hook froze them already)

        # R_0 = lambda * sqrt(b_w); a global U over layers of mixed bit widths uses the
        # numel-weighted mean of the layers' R_0 (qatlab's choice; all equal in practice).
        def r0(ns: list[str]) -> float:
            sizes = [layers[n].weight.numel() for n in ns]
            rates = [lam * math.sqrt(layers[n].weight_quantizer.bits) for n in ns]
            return sum(s * r for s, r in zip(sizes, rates, strict=True)) / sum(sizes)

        self.R0 = {k: r0([k] if per_layer else names) for k in self.keys}
        first = self.groups[0]
        lr0 = first.get("initial_lr", first["lr"])
        self.eta = eta or lr0
        u_start = u0 or lr0
        self.t = 0
        self.U = {k: float(u_start) for k in self.keys}  # U_t: used by the next step
        self.K = {k: 0.0 for k in self.keys}  # K_t, K_0 = 0
        self.k = {k: 0.0 for k in self.keys}  # k_t of the last step
        self.R = {k: self.target(k, 0) for k in self.keys}  # R_t of the last step

    @property
    def groups(self) -> list[dict]:
        """The TALR parameter groups, looked up on every call: ``load_state_dict`` of a torch
        optimizer replaces its group dicts."""
        return [g for opt in torch_optimizers(self.base) for g in opt.param_groups if "talr" in g]

    def target(self, key: str, t: int) -> float:
        """``R_t`` of ``key``."""
        return target_rate(
            t, self.total_steps, self.R0[key], self.schedule, self.milestones, self.gamma
        )

    def step(self, closure: Callable | None = None):
        groups = self.groups
        loop_lr = [g["lr"] for g in groups]  # rule 1: the loop owns lr; put it back
        for g in groups:
            g["lr"] = self.U[g["talr"]]
        try:
            loss = self.base.step(closure)
        finally:
            for g, lr in zip(groups, loop_lr, strict=True):
                g["lr"] = lr
        moves = self.counter.update(self.model, self.t)
        self.observe(moves.layer_rates() if self.per_layer else {GLOBAL: moves.rate()})
        return loss

    def observe(self, rates: dict[str, float]) -> None:
        """One update from the measured rates ``{key: k_t}`` of step ``t``::

        K_t = m * K_{t-1} + (1 - m) * k_t
        U_t = max(0, U_{t-1} + eta * (R_t - K_t))
        """
        t = self.t
        for key in self.keys:
            k_t = float(rates[key])
            R_t = self.target(key, t)
            K_t = self.m * self.K[key] + (1.0 - self.m) * k_t
            U_t = max(0.0, self.U[key] + self.eta * (R_t - K_t))
            self.k[key], self.K[key], self.R[key], self.U[key] = k_t, K_t, R_t, U_t
        self.t = t + 1

    def metrics(self) -> dict[str, float]:
        """``talr_k``, ``talr_K``, ``talr_R``, ``talr_U`` of the last step (global; means over
        layers with ``per_layer``, plus ``talr_U/<layer>`` and ``talr_K/<layer>``)."""
        out = {}
        for name, values in (("k", self.k), ("K", self.K), ("R", self.R), ("U", self.U)):
            out[f"talr_{name}"] = sum(values.values()) / len(values)
        if self.per_layer:
            out.update({f"talr_U/{k}": u for k, u in self.U.items()})
            out.update({f"talr_K/{k}": v for k, v in self.K.items()})
        return out

    def wrapper_state(self) -> dict:
        return {"t": self.t, "U": dict(self.U), "K": dict(self.K), "k": dict(self.k),
                "R": dict(self.R)}  # fmt: skip

    def load_wrapper_state(self, state: dict) -> None:
        if not state:
            return
        if set(state["U"]) != set(self.keys):
            raise ValueError(f"TALR state has keys {sorted(state['U'])}, expected {self.keys}")
        self.t = int(state["t"])
        for name in ("U", "K", "k", "R"):
            getattr(self, name).update({k: float(v) for k, v in state[name].items()})


# ----------------------------------------------------------------------------- the hook
class TALRHook(nn.Module, Hook):
    """TR scheduling as a :class:`Hook`: freezes the counted layers' weight step sizes when
    built, wraps the optimizer in :class:`TALR`, logs ``k_t, K_t, R_t, U_t`` every
    ``log_every`` steps.

    ``self.transitions`` is the :class:`TransitionCounter` TALR reads (its previous integers
    are a buffer of this module, so they travel with the checkpoint); the trainer's
    transition-rate log reuses it instead of counting twice.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        lam: float = 5e-3,
        momentum: float = 0.99,
        schedule: str = "cosine",
        per_layer: bool = False,
        eta: float | None = None,
        u0: float | None = None,
        include_pinned: bool = False,
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        log_every: int = 50,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.transitions = TransitionCounter(model, include_pinned=include_pinned)
        self.frozen = freeze_weight_steps(model, self.transitions.layer_names)
        self.total_steps = total_steps
        self.options = dict(
            lam=lam,
            momentum=momentum,
            schedule=schedule,
            per_layer=per_layer,
            eta=eta,
            u0=u0,
            milestones=tuple(milestones),
            gamma=gamma,
        )
        self.log_every = log_every
        self.optimizer: TALR | None = None

    def wrap_optimizer(self, optimizer: Any, model: nn.Module) -> TALR:
        self.optimizer = TALR(
            optimizer, model, self.total_steps, counter=self.transitions, **self.options
        )
        return self.optimizer

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        if self.optimizer is None or not self.log_every or (step + 1) % self.log_every:
            return None
        return self.optimizer.metrics()


# ----------------------------------------------------------------------------- registry
@register_method("talr", aliases={"lambda": "lam"}, needs_quant=True)
def _talr(
    model,
    quant,
    total_steps,
    lam: float = 5e-3,
    momentum: float = 0.99,
    schedule: str = "cosine",
    per_layer: bool = False,
    eta: float = 0.0,  # 0: the initial LR of the latent weights
    u0: float = 0.0,  # 0: = eta's default, the initial LR
    include_pinned: bool = False,
    milestones: str = "0.5,0.75",  # schedule "step": fractions of training
    gamma: float = 0.1,  # schedule "step": factor at each milestone
    log_every: int = 50,
) -> list[Hook]:
    """QAT with a scheduled transition rate: TALR sets the latent weights' LR (Lee et al.)."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"method.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    for name, value in (("lam", lam), ("eta", eta), ("u0", u0), ("gamma", gamma)):
        if value < 0:
            raise ConfigError(f"method.{name} must be >= 0, got {value}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"method.momentum must be in [0, 1), got {momentum}")
    try:
        marks = tuple(float(m) for m in milestones.split(",") if m.strip())
    except ValueError:
        raise ConfigError(
            f"method.milestones must be like '0.5,0.75', got {milestones!r}"
        ) from None
    return [
        TALRHook(
            model,
            total_steps,
            lam,
            momentum,
            schedule,
            per_layer,
            eta or None,
            u0 or None,
            include_pinned,
            marks,
            gamma,
            log_every,
        )
    ]
