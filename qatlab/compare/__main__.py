"""``python -m qatlab.compare STUDY``: run a study's grid (resumable) and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from qatlab.compare import oscillations, oscreg, saq, talr

STUDIES = {
    "oscillations": oscillations.main,
    "oscreg": oscreg.main,
    "saq": saq.main,
    "talr": talr.main,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qatlab.compare", description=__doc__)
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--runs", default="runs/compare", help="where the runs go (resumable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke test")
    args = parser.parse_args(argv)
    text = STUDIES[args.study](Path(args.out), Path(args.runs), args.seeds, args.jobs, args.quick)
    print(text)


if __name__ == "__main__":
    main()
