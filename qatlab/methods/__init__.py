"""Training methods, each a set of :class:`qatlab.train.Hook` objects usable in any loop.

A method module registers a builder with its options and their defaults::

    @register_method("dampen", options={"lambda_max": 0.1}, aliases={"lambda": "lambda_max"})
    def _dampen(model, quant, total_steps, lambda_max):
        return [OscillationDampening(lambda_max)]

and is imported at the bottom of this file (one line per method). Options are checked against
the declared defaults (name and type) before any run starts; ``aliases`` let generic CLI flags
(``--lambda``, ``--target-bits``) reach a method's own option names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatlab.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from qatlab.quant import QuantConfig
    from qatlab.train.config import MethodConfig
    from qatlab.train.hooks import Hook


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: builder, option defaults, option aliases, whether it needs quant."""

    name: str
    build: Callable[..., list]
    options: dict[str, Any]
    aliases: dict[str, str]
    needs_quant: bool | None  # True: quantized runs only; False: float only; None: either


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: dict[str, Any] | None = None,
    aliases: dict[str, str] | None = None,
    needs_quant: bool | None = None,
) -> Callable:
    """Decorator: register ``build(model, quant, total_steps, **options) -> list[Hook]``."""

    def wrap(build: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodSpec(
            name, build, dict(options or {}), dict(aliases or {}), needs_quant
        )
        return build

    return wrap


def list_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is a ConfigError with a suggestion."""
    if name not in METHODS:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown method {name!r}{tip}; available: {', '.join(list_methods())}")
    return METHODS[name]


def check_options(method: MethodConfig) -> dict[str, Any]:
    """Return ``method.options`` with aliases resolved and defaults filled in, or raise."""
    spec = get_method(method.name)
    out = dict(spec.options)
    for key, value in method.options.items():
        name = spec.aliases.get(key, key)
        if name not in spec.options:
            valid = list(spec.options) + list(spec.aliases)
            hint = difflib.get_close_matches(key, valid, n=1)
            if hint:
                tip = f" (did you mean '{hint[0]}'?)"
            elif valid:
                tip = f"; its options: {', '.join(valid)}"
            else:
                tip = "; it takes no options"
            raise ConfigError(f"unknown key '{key}' in method {method.name}{tip}")
        out[name] = _like(value, spec.options[name], f"method.{name}")
    return out


def build_hooks(
    method: MethodConfig, model: nn.Module, quant: QuantConfig | None, total_steps: int
) -> list[Hook]:
    """The hooks that implement ``method`` for ``model`` (already quantized if ``quant``)."""
    spec = get_method(method.name)
    if spec.needs_quant is True and quant is None:
        raise ConfigError(f"method {spec.name} trains a quantized model: give --wbits")
    if spec.needs_quant is False and quant is not None:
        raise ConfigError(f"method {spec.name} trains a float model: drop --wbits")
    return list(spec.build(model, quant, total_steps, **check_options(method)))


def _like(value: Any, default: Any, name: str) -> Any:
    """Check ``value`` against the type of its default (ints pass as floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{name} must be like {default!r} ({type(default).__name__}), got {value!r}"
        )
    return value


# ----------------------------------------------------------------------------- built-in
@register_method("float", needs_quant=False)
def _float(model: nn.Module, quant: QuantConfig | None, total_steps: int) -> list[Hook]:
    """Plain float training: no hooks."""
    return []


@register_method("qat", needs_quant=True)
def _qat(model: nn.Module, quant: QuantConfig | None, total_steps: int) -> list[Hook]:
    """Plain QAT (LSQ by default): the quantized model trains as is, no hooks."""
    return []


# ----------------------------------------------------------------------------- method modules
# Each imported module registers its methods with @register_method: one line per module.
from qatlab.methods import oscillation, oscreg  # noqa: E402, F401  (track, dampen, freeze, oscreg)
