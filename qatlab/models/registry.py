"""The registry itself: a name -> builder map with shape checks."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from qatlab.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Decorator: ``build(num_classes, input_shape, **kwargs) -> nn.Module``."""

    def wrap(build: Callable) -> Callable:
        _MODELS[name] = build
        return build

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def create(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build model ``name`` for ``input_shape`` ((C, L) or (C, H, W)) and ``num_classes``."""
    if name not in _MODELS:
        hint = difflib.get_close_matches(name, list(_MODELS), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown model {name!r}{tip}; choose from {', '.join(list_models())}")
    build = _MODELS[name]
    accepted = set(inspect.signature(build).parameters) - {"num_classes", "input_shape"}
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"model {name} has no option {key!r}; its options: {sorted(accepted)}"
            )
    return build(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


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
