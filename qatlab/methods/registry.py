"""The method registry: :func:`register_method` and the look-ups the trainer, the CLI and the
comparison engine use (:func:`get_method`, :func:`check_options`, :func:`build_hooks`), plus the
two built-in methods without hooks (``float``, ``qat``).

A leaf of :mod:`qatlab.methods`: method modules import it to register themselves, and the package
``__init__`` imports it and then every method module, so the registry never imports a method.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatlab.checks import like
from qatlab.errors import ConfigError
from qatlab.methods.base import Hook

if TYPE_CHECKING:
    from torch import nn

    from qatlab.quant import QuantConfig


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: builder, option defaults, option aliases, whether it needs quant,
    and the check of its option values."""

    name: str
    build: Callable[..., list]
    options: dict[str, Any]
    aliases: dict[str, str]
    needs_quant: bool | None  # True: quantized runs only; False: float only; None: either
    description: str
    check: Callable[..., None] | None = None  # check(**options): a ConfigError if impossible


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    aliases: dict[str, str] | None = None,
    needs_quant: bool | None = None,
    check: Callable[..., None] | None = None,
) -> Callable:
    """Decorator: register ``build(model, quant, total_steps, **options) -> list[Hook]``.

    The options are the builder's keyword arguments after the first three, with their defaults
    (their one declaration: names, defaults and types). ``check(**options)`` raises a one-line
    ConfigError for impossible values (a choice not offered, a negative rate); it runs in
    :func:`check_options`, the one place options are checked, when a run config is validated,
    so a bad value in any cell of a grid is refused before anything trains.
    """

    def wrap(build: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        params = list(inspect.signature(build).parameters.values())[3:]
        missing = [p.name for p in params if p.default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"method {name!r}: options without a default: {missing}")
        doc = (build.__doc__ or "").strip().splitlines()
        METHODS[name] = MethodSpec(
            name,
            build,
            {p.name: p.default for p in params},
            dict(aliases or {}),
            needs_quant,
            doc[0] if doc else "",
            check,
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


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Return ``options`` of method ``name`` with aliases resolved and defaults filled in, or
    raise a one-line ConfigError: unknown name, wrong type, or a value the method's ``check``
    refuses."""
    spec = get_method(name)
    out = dict(spec.options)
    for key, value in options.items():
        option = spec.aliases.get(key, key)
        if option not in spec.options:
            valid = list(spec.options) + list(spec.aliases)
            hint = difflib.get_close_matches(key, valid, n=1)
            if hint:
                tip = f" (did you mean '{hint[0]}'?)"
            elif valid:
                tip = f"; its options: {', '.join(valid)}"
            else:
                tip = "; it takes no options"
            raise ConfigError(f"unknown key '{key}' in method {name}{tip}")
        out[option] = like(value, spec.options[option], f"method.{option}")
    if spec.check is not None:
        spec.check(**out)
    return out


def build_hooks(
    name: str,
    options: dict[str, Any],
    model: nn.Module,
    quant: QuantConfig | None,
    total_steps: int,
) -> list[Hook]:
    """The hooks that implement method ``name`` for ``model`` (already quantized if ``quant``)."""
    spec = get_method(name)
    if spec.needs_quant is True and quant is None:
        raise ConfigError(f"method {spec.name} trains a quantized model: give --wbits")
    if spec.needs_quant is False and quant is not None:
        raise ConfigError(f"method {spec.name} trains a float model: drop --wbits")
    return list(spec.build(model, quant, total_steps, **check_options(name, options)))


# ----------------------------------------------------------------------------- built-in
@register_method("float", needs_quant=False)
def _float(model: nn.Module, quant: QuantConfig | None, total_steps: int) -> list[Hook]:
    """Float training (no quantization, no hooks)."""
    return []


@register_method("qat", needs_quant=True)
def _qat(model: nn.Module, quant: QuantConfig | None, total_steps: int) -> list[Hook]:
    """Plain QAT with the configured quantizer (LSQ by default), no extra terms."""
    return []
