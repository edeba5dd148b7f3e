"""The one way a method plugs into any training loop: a ``Hook`` with no-op defaults."""

from __future__ import annotations

from torch import Tensor, nn


class Hook:
    """Base class with no-op defaults; a method overrides what it needs.

    - ``loss_term``: added to the task loss (training mode only);
    - ``wrap_optimizer``: optimizer wrappers own ``.step(closure)``;
    - ``after_step``: after ``optimizer.step``, returns metrics to log;
    - ``eval_metrics``: extra metrics at evaluation time.
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
