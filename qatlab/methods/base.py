"""The method interface: a :class:`Hook` (loss term, optimizer wrapper, after-step callback,
eval metrics) and the rules an :class:`OptimizerWrapper` follows. Nothing here needs the
trainer: any PyTorch loop can use every method.

One training step (what :func:`qatlab.train.train_step` does, and what your loop can do)::

    optimizer = base_optimizer
    for hook in hooks:                          # once, before training
        optimizer = hook.wrap_optimizer(optimizer, model)

    def closure(sync=True):                     # may run more than once (two-pass wrappers)
        optimizer.zero_grad()
        loss = task_loss(model(x), y)
        for hook in hooks:
            term = hook.loss_term(model, step, total_steps)
            loss = loss if term is None else loss + term
        loss.backward()
        return loss

    optimizer.step(closure)
    for hook in hooks:
        hook.after_step(model, step, total_steps)   # returns metrics to log, or None

Rules for optimizer wrappers (SAM's ``first_step``/``second_step`` + ``step(closure)`` shape,
Lookahead's delegation):

1. **The loop owns the learning rate.** It writes the scheduled ``lr`` into
   ``optimizer.param_groups`` (the base optimizer's own group dicts, which a wrapper exposes)
   before each step. A wrapper that adapts the rate (TALR) sets its rate inside ``step`` and
   puts the loop's value back before returning.
2. **The closure** zeroes gradients, runs forward and backward, and returns the loss. The first
   call of a step is the one the loop logs. ``closure(sync=False)`` asks a DDP loop to skip the
   gradient all-reduce of that pass (``no_sync``): a per-replica first pass.
3. **Passes after the first** run inside :func:`frozen_bn_stats`: BatchNorm normalizes with
   batch statistics as usual but its running statistics change once per step, not per pass.
4. **State** that must survive a restart: ``wrapper_state``/``load_wrapper_state``. The trainer
   checkpoints only the outermost optimizer; ``state_dict`` nests ``{"base": ..., "wrapper": ...}``
   so wrappers of wrappers round-trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

_BN = nn.modules.batchnorm._BatchNorm


class Hook:
    """Base class with no-op defaults; a method overrides what it needs.

    - ``loss_term``: added to the task loss (training mode);
    - ``wrap_optimizer``: returns an optimizer (usually an :class:`OptimizerWrapper`) that owns
      ``step(closure)``;
    - ``after_step``: after the optimizer step; returns metrics to log, or None;
    - ``eval_metrics``: extra metrics at evaluation time, logged as ``f"{split}_{key}"`` (so they
      can drive early stopping). ``data`` has ``.train_eval``, ``.val``, ``.test`` datasets.

    State that must survive a restart goes in :meth:`state_dict` (a Hook that is also an
    ``nn.Module`` gets its buffers saved through ``nn.Module.state_dict``).

    ``eager_only = True`` marks a method whose forward pass ``torch.compile`` cannot follow
    (it keeps intermediate tensors' gradients): ``train.compile`` then trains eagerly and
    says so in one line.
    """

    eager_only: bool = False

    def loss_term(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        return None

    def wrap_optimizer(self, optimizer: Any, model: nn.Module) -> Any:
        return optimizer

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        return None

    def eval_metrics(self, model: nn.Module, data: Any, split: str) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class OptimizerWrapper:
    """Base of optimizer wrappers: delegates ``param_groups``, ``state``, ``zero_grad`` and
    ``defaults`` to the wrapped optimizer, and nests its own state in ``state_dict``.

    Subclasses implement ``step(closure)`` and, if they have state, ``wrapper_state`` /
    ``load_wrapper_state``. See the module docstring for the rules.
    """

    def __init__(self, base: Any) -> None:
        self.base = base

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self) -> dict:
        return self.base.state

    @property
    def defaults(self) -> dict:
        return getattr(self.base, "defaults", {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def wrapper_state(self) -> dict:
        """This wrapper's own state (tensors, numbers), saved with the checkpoint."""
        return {}

    def load_wrapper_state(self, state: dict) -> None:
        return None

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "wrapper": self.wrapper_state()}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.load_wrapper_state(state.get("wrapper", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm layers in training mode normalize with batch statistics but leave their running
    statistics (and ``num_batches_tracked``) untouched inside the block: for a second forward
    pass of the same step."""
    changed = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False  # train mode + no tracking: batch stats, no update
    try:
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


def grad_norm(tensors: list[Tensor]) -> Tensor:
    """Global L2 norm of a list of tensors (0-d tensor, no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
