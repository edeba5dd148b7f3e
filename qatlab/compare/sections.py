"""The registry of report sections: :func:`register_section` and the two lists it fills.

A leaf of :mod:`qatlab.compare`: :mod:`qatlab.compare.report` (the default sections and the
renderer), the opt-in section modules and :mod:`qatlab.compare.spec` (which checks a grid's
``sections:`` names) import it, and it imports none of them. The package ``__init__`` imports
the opt-in section modules, so they are registered whenever :mod:`qatlab.compare` is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Section = Callable[[Any], list]  # fn(results: report.Results) -> blocks

SECTIONS: list[tuple[str, Section]] = []
EXTRA_SECTIONS: dict[str, Section] = {}  # only where a grid asks for them


def register_section(name: str, default: bool = True) -> Callable:
    """Decorator: ``fn(results) -> blocks`` adds a report section. Default sections appear in
    every report (in registration order); the others only in reports of grids that list them
    under ``sections:`` (right after the header), e.g. a study's verdict on a paper's claims."""

    def wrap(fn: Callable) -> Callable:
        if default:
            SECTIONS.append((name, fn))
        else:
            EXTRA_SECTIONS[name] = fn
        return fn

    return wrap
