"""``python -m qatlab.compare oscreg``: the oscillation-regularization study (its own module,
until it becomes a preset); any other name is ``qatlab compare NAME ...`` (a grid file or
preset such as ``oscillations``, ``demo``, ``full``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "oscreg":
        from qatlab.cli import main as cli

        sys.exit(cli(["compare", *argv]))
    from qatlab.compare import oscreg

    parser = argparse.ArgumentParser(prog="python -m qatlab.compare oscreg", description=__doc__)
    parser.add_argument("study", choices=["oscreg"])
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--runs", default="runs/compare", help="where the runs go (resumable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke test")
    args = parser.parse_args(argv)
    print(oscreg.main(Path(args.out), Path(args.runs), args.seeds, args.jobs, args.quick))


if __name__ == "__main__":
    main()
