"""Monitors: logging hooks that are not training methods, attached by name from a config.

``train.monitors: [{name: flips, every: 10}]`` (in a run's YAML, or ``monitors:`` in a
comparison grid or stage) builds each named monitor after the method's hooks; it sees the model
after every optimizer step, and whatever it returns is written to ``metrics.jsonl`` as a step
record (as a method hook's metrics are). A monitor never changes the model or the loss; its
state (an ``nn.Module``'s buffers) is saved in ``ckpt.pt`` with the hooks, so a resumed run logs
exactly what an uninterrupted one does.

A new monitor is one registration::

    @register_monitor("name")
    def build(model, hooks, steps_per_epoch, every: int = 1, **options) -> Hook | None: ...

It returns None when it has nothing to watch (e.g. ``flips`` on a float model).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qatlab.errors import ConfigError
from qatlab.methods.base import Hook

MONITORS: dict[str, Callable[..., Hook | None]] = {}


def register_monitor(name: str) -> Callable:
    """Decorator: register ``fn(model, hooks, steps_per_epoch, **options) -> Hook | None``."""

    def wrap(fn: Callable) -> Callable:
        MONITORS[name] = fn
        return fn

    return wrap


def _options(fn: Callable) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params}


def check_monitors(specs: Any, where: str = "train.monitors") -> None:
    """``[{name: NAME, **options}, ...]``: one ConfigError line for the first mistake."""
    if not isinstance(specs, list):
        raise ConfigError(f"{where} must be a list of {{name: ..., every: ...}}, got {specs!r}")
    for spec in specs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: each monitor is a mapping with a name, got {spec!r}")
        name = spec["name"]
        if name not in MONITORS:
            hint = difflib.get_close_matches(str(name), list(MONITORS), n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown monitor {name!r}{tip}; available: {', '.join(sorted(MONITORS))}"
            )
        valid = _options(MONITORS[name])
        for key in spec:
            if key == "name":
                continue
            if key not in valid:
                hint = difflib.get_close_matches(key, list(valid), n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else f"; options: {', '.join(valid)}"
                raise ConfigError(f"unknown option '{key}' of monitor {name}{tip}")
        every = spec.get("every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"monitor {name}: every must be an integer >= 1, got {every!r}")


def build_monitors(
    specs: list[dict[str, Any]], model: nn.Module, hooks: list, steps_per_epoch: int
) -> list[Hook]:
    """The monitors ``specs`` name, built for ``model`` (after the method ``hooks``)."""
    check_monitors(specs)
    out: list[Hook] = []
    for spec in specs:
        options = {k: v for k, v in spec.items() if k != "name"}
        monitor = MONITORS[spec["name"]](model, list(hooks), steps_per_epoch, **options)
        if monitor is not None:
            out.append(monitor)
    return out


# ----------------------------------------------------------------------------- monitors
class FlipLog(nn.Module, Hook):
    """Logs the transition rate ``tr`` (k_t: share of counted weights whose integer changed in
    the step) every ``every`` steps and, at the end of each epoch, ``tr_epoch`` (mean k_t over
    the epoch) and ``flip_share_epoch`` (share of counted weights whose integer changed at least
    once in the epoch). Reuses a method's counter (``hook.transitions``) when there is one, so
    a method and this log see the same k_t. It reads k_t to the host every step."""

    def __init__(
        self, model: nn.Module, hooks: list, steps_per_epoch: int, log_every: int = 1
    ) -> None:
        from qatlab.quant.transitions import TransitionCounter, _key

        super().__init__()
        self._key = _key
        shared = [h.transitions for h in hooks if hasattr(h, "transitions")]
        if shared:
            self._shared = shared[:1]  # a list: not a submodule (its owner saves it)
        else:
            self._shared = []
            self.own = TransitionCounter(model)
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        for name in self.counter.layer_names:
            shape = self.counter.previous(name).shape
            self.register_buffer(f"{_key(name)}__moved", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("k_sum", torch.zeros((), dtype=torch.float64))

    @property
    def counter(self):
        return self._shared[0] if self._shared else self.own

    @property
    def transitions(self):
        """The counter (the loop's ``tr`` log shares it rather than counting twice)."""
        return self.counter

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        moves = self.counter.update(model, step)
        for name, d in moves.direction.items():
            getattr(self, f"{self._key(name)}__moved").logical_or_(d != 0)
        k = moves.rate()
        self.k_sum += k
        out = {"tr": k} if self.log_every and (step + 1) % self.log_every == 0 else {}
        if (step + 1) % self.steps_per_epoch == 0:
            masks = [getattr(self, f"{self._key(n)}__moved") for n in self.counter.layer_names]
            moved = sum(int(m.sum()) for m in masks)
            out["flip_share_epoch"] = moved / max(sum(m.numel() for m in masks), 1)
            out["tr_epoch"] = float(self.k_sum) / self.steps_per_epoch
            for m in masks:
                m.zero_()
            self.k_sum.zero_()
        return out or None


@register_monitor("flips")
def flips(model: nn.Module, hooks: list, steps_per_epoch: int, every: int = 1) -> Hook | None:
    """:class:`FlipLog`: ``tr`` every ``every`` steps, ``tr_epoch`` and ``flip_share_epoch``
    per epoch. Nothing on a float model (no integers to flip)."""
    from qatlab.quant import is_quantized

    if not is_quantized(model):
        return None
    return FlipLog(model, hooks, steps_per_epoch, every)


class WeightNorm(Hook):
    """Logs ``w_norm``: the L2 norm of all weights of the model, every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        if (step + 1) % self.every:
            return None
        total = sum(float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters()
                    if n.endswith("weight"))  # fmt: skip
        return {"w_norm": total**0.5}


@register_monitor("weight_norm")
def weight_norm(model: nn.Module, hooks: list, steps_per_epoch: int, every: int = 1) -> Hook:
    """:class:`WeightNorm`: ``w_norm`` every ``every`` steps."""
    return WeightNorm(every)
