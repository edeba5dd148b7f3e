"""Cost of the from-scratch step-size recipe's optimizers (LogAdam on weight steps) per step.

The benchmark net at LSQ W4A4 (``common.quantized_reference``), one thread, interleaved:
``adam`` = one torch Adam on every parameter; ``recipe`` = qatlab's ``make_optimizer`` with
the from-scratch defaults (Adam on weights and activation steps, LogAdam on weight steps).
Prints the median full training step and the median ``optimizer.step()`` alone, in ms.

Run: ``python benchmarks/optimizer_overhead.py [--steps 40]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import data, quantized_reference
from torch import nn

from qatlab.train.config import TrainConfig
from qatlab.train.optim import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data(64, torch.device("cpu"))
    variants = {}
    for name in ("adam", "recipe"):
        model = quantized_reference(x)
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = make_optimizer(model, TrainConfig(lr=1e-3).validate())
        variants[name] = (model, opt)

    def step(model, opt) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for model, opt in variants.values():  # warm-up
        for _ in range(5):
            step(model, opt)
    full: dict[str, list[float]] = {k: [] for k in variants}
    opt_only: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps):
        for name in list(variants)[:: 1 if i % 2 else -1]:  # alternate the order
            model, opt = variants[name]
            t0 = time.perf_counter()
            step(model, opt)
            t1 = time.perf_counter()
            opt.step()  # the same gradients again: the optimizer's own cost
            full[name].append(t1 - t0)
            opt_only[name].append(time.perf_counter() - t1)
    for name in variants:
        print(
            f"{name:7s} step {statistics.median(full[name]) * 1e3:8.2f} ms   "
            f"optimizer.step {statistics.median(opt_only[name]) * 1e3:6.3f} ms"
        )
    ratio = statistics.median(full["recipe"]) / statistics.median(full["adam"])
    print(f"recipe / adam, full step: {ratio:.3f}x (median; noisy on a shared machine)")


if __name__ == "__main__":
    main()
