"""Per-step overhead of oscillation tracking, dampening, freezing and TALR, as a ratio to plain QAT.

Reference net and input as in ``step_overhead.py``; variants interleaved (ABCD ABCD ...) so
drift on a shared machine hits them alike. Run: ``python benchmarks/oscillation_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import qatlab
from qatlab.methods.oscillation import IterativeFreezing, OscillationDampening, OscillationTracker
from qatlab.methods.talr import TALRHook

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import reference_net  # noqa: E402  (the same reference net)

KINDS = ("qat", "qat+tracking", "qat+dampening", "qat+freezing", "qat+talr")


def make_variant(kind: str, x: torch.Tensor, total: int):
    torch.manual_seed(0)
    q = qatlab.quantize(reference_net(), qatlab.QuantConfig(weight_bits=4, act_bits=4))
    qatlab.calibrate(q, [x])
    hooks = {
        "qat": [],
        "qat+tracking": [OscillationTracker(q, momentum=0.01, log_every=0)],
        "qat+dampening": [OscillationDampening(lambda_max=0.1, start=0.0)],
        "qat+freezing": [IterativeFreezing(q, momentum=0.01, start=0.0, log_every=0)],
        "qat+talr": [TALRHook(q, total, log_every=0)],  # freezes weight steps: built first
    }[kind]
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    for h in hooks:
        opt = h.wrap_optimizer(opt, q)
    return q, hooks, opt


def step(q, hooks, opt, x, y, i, total) -> None:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(q(x), y)
    for h in hooks:
        extra = h.loss_term(q, i, total)
        if extra is not None:
            loss = loss + extra
    loss.backward()
    opt.step()
    for h in hooks:
        h.after_step(q, i, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument(
        "--variants", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    kinds = ["qat", *[k for k in args.variants.split(",") if k != "qat"]]
    total = args.steps + args.warmup
    variants = {k: make_variant(k, x, total) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(total):
        for k in kinds:
            start = time.perf_counter()
            step(*variants[k], x, y, i, total)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - start)
    base = statistics.median(times["qat"])
    rows = []
    print(f"threads={torch.get_num_threads()} batch={args.batch} steps={args.steps}\n")
    print("| variant | median step (ms) | ratio to QAT |")
    print("|---|---:|---:|")
    for k in kinds:
        med = statistics.median(times[k])
        rows.append({"variant": k, "median_ms": med * 1e3, "ratio": med / base})
        print(f"| {k} | {med * 1e3:.1f} | {med / base:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
