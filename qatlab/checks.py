"""Argument checks shared by every layer: each failure is one ConfigError line that names the
argument, what it must be, and (for near misses) what was probably meant."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from qatlab.errors import ConfigError


def check_keys(data: dict[str, Any], names: list[str], where: str) -> None:
    """Every key of ``data`` is one of ``names``, else a suggestion or the valid keys."""
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{key}' in {where}{tip}")


def mapping(data: Any, where: str) -> dict[str, Any]:
    """``data`` if it is a dict (a YAML mapping)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of key: value, got {type(data).__name__}")
    return data


def typed(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` if it fits type ``tp`` (ints pass as floats; "1e-3" becomes 1e-3)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return typed(value, arg, name)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    origin = typing.get_origin(tp) or tp
    if origin is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML reads 1e-3 as a string
        except ValueError:
            pass
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    ok = isinstance(value, origin) and not (origin is int and isinstance(value, bool))
    if tp is Any or ok:
        return value
    want = getattr(origin, "__name__", str(origin))
    raise ConfigError(f"{name} must be {_article(want)}, got {value!r}")


def like(value: Any, default: Any, name: str) -> Any:
    """``value`` checked against the type of ``default`` (a None on either side passes)."""
    if default is None or value is None:
        return value
    return typed(value, type(default), name)


def _article(word: str) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    return names.get(word, f"a {word}")


def choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``, else a one-line error with the closest choice."""
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}{tip}"
        )


def positive(name: str, value: Any, integer: bool = True) -> None:
    """``value`` is a positive number (a positive integer if ``integer``)."""
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
