"""The one way a method plugs into any training loop: a ``Hook`` with no-op defaults.

One training step of :func:`qatlab.train.fit` (and of any loop that wants the methods)::

    optimizer = base_optimizer
    for hook in hooks:                     # once, before training
        optimizer = hook.wrap_optimizer(optimizer)

    def closure():                         # may be called more than once (two-pass wrappers)
        base_optimizer.zero_grad()
        loss = task_loss(model(x), y)
        for hook in hooks:
            term = hook.loss_term(model, step, total_steps)
            if term is not None:
                loss = loss + term
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    for hook in hooks:
        metrics = hook.after_step(model, step, total_steps)   # logged when not None

``step`` counts optimizer steps from 0 over the whole run and ``total_steps`` is the run's
length, so schedules are plain functions of ``step / total_steps`` and survive a resume.
``model`` is always the bare model (never a DDP wrapper). State that must survive a restart
goes in :meth:`Hook.state_dict` (a hook that is also an ``nn.Module`` gets its buffers saved
through ``nn.Module.state_dict``).
"""

from __future__ import annotations

from torch import Tensor, nn


class Hook:
    """Base class with no-op defaults; a method overrides what it needs.

    - ``loss_term``: added to the task loss (training mode only);
    - ``wrap_optimizer``: optimizer wrappers own ``.step(closure)``;
    - ``after_step``: after ``optimizer.step``, returns metrics to log;
    - ``eval_metrics``: extra metrics at evaluation time. ``data`` is the run's
      :class:`qatlab.data.DataBundle`, ``split`` is ``"val"`` or ``"test"`` (evaluate
      ``getattr(data, split)``); the trainer logs each key as ``f"{split}_{key}"`` so it can be
      the early-stopping metric (e.g. ``val_ptq3_acc``).
    """

    def loss_term(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        return None

    def wrap_optimizer(self, optimizer):
        return optimizer

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        return None

    def eval_metrics(self, model: nn.Module, data, split: str) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
