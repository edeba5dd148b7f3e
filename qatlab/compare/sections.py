"""The registry of report sections: :func:`register_section` and the two lists it fills; and
:class:`Table`, the table block every section builds.

A leaf of :mod:`qatlab.compare`: :mod:`qatlab.compare.report` (the default sections and the
renderer), the opt-in section modules and :mod:`qatlab.compare.spec` (which checks a grid's
``sections:`` names) import it, and it imports none of them. The package ``__init__`` imports
the opt-in section modules, so they are registered whenever :mod:`qatlab.compare` is loaded.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    marked: set[tuple[int, int]] = field(default_factory=set)  # (row, col): best in its column

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join("---" for _ in self.headers) + "|",
        ]
        for i, row in enumerate(self.rows):
            cells = [f"**{c}**" if (i, j) in self.marked else c for j, c in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(
                f"<td><b>{html.escape(c)}</b></td>"
                if (i, j) in self.marked
                else f"<td>{html.escape(c)}</td>"
                for j, c in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
