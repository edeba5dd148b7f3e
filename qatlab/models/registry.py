"""The registry itself: a name -> builder map, with input-shape and option checks."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from qatlab import checks
from qatlab.errors import ConfigError

Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``build(num_classes, input_shape, **kwargs) -> nn.Module`` as ``name``.

    Registering a different builder under a taken name is an error (re-registering the same
    function, e.g. on module reload, is not).
    """

    def wrap(build: Builder) -> Builder:
        old = _MODELS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (
            build.__module__,
            build.__qualname__,
        ):
            raise ValueError(f"model name {name!r} is already registered by {old.__module__}")
        _MODELS[name] = build
        return build

    return wrap


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build model ``name`` for per-sample ``input_shape`` ((C, L) or (C, H, W)) with
    ``num_classes`` logits; ``kwargs`` are the model's options (e.g. ``width``)."""
    if name not in _MODELS:
        hint = difflib.get_close_matches(str(name), list(_MODELS), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown model {name!r}{tip}; choose from {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"input_shape must be positive integers like (C, L), got {shape}")
    build = _MODELS[name]
    accepted = set(inspect.signature(build).parameters) - {"num_classes", "input_shape"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"model {name} has no option {unknown[0]!r}; its options: {sorted(accepted)}"
        )
    return build(num_classes=num_classes, input_shape=shape, **kwargs)


def conv_dims(name: str, input_shape: tuple[int, ...]) -> int:
    """1 for (C, L) signals, 2 for (C, H, W) images; anything else is a clear error."""
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"model {name} needs inputs shaped (C, L) or (C, H, W), got {tuple(input_shape)}"
        )
    return len(input_shape) - 1


def layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv, BatchNorm, AdaptiveAvgPool) classes for 1-D or 2-D inputs."""
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d


def positive(name: str, option: str, value: float, integer: bool = True) -> None:
    """Raise a ConfigError unless model ``name``'s ``option`` is a positive number."""
    checks.positive(f"model {name}: {option}", value, integer)
