"""``python -m qatlab.compare STUDY``: the studies that are still modules of their own (talr:
it needs analyses that the grid report does not have yet). A grid file or a preset (``saq``,
``oscreg``, ``oscillations``, ``demo``, ``full``) runs with ``qatlab compare NAME``: this
module does not call the CLI, which sits above :mod:`qatlab.compare` in the layers."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

STUDIES = ("talr",)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in STUDIES:
        sys.exit(
            f"error: {argv[0]!r} is not a study module ({', '.join(STUDIES)}); "
            f"run a grid or preset with: qatlab compare {argv[0]}"
        )
    parser = argparse.ArgumentParser(prog="python -m qatlab.compare", description=__doc__)
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--runs", default="runs/compare", help="where the runs go (resumable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke test")
    args = parser.parse_args(argv)
    study = importlib.import_module(f"qatlab.compare.{args.study}")
    print(study.main(Path(args.out), Path(args.runs), args.seeds, args.jobs, args.quick))


if __name__ == "__main__":
    main()
