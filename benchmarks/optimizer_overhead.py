"""Cost of the from-scratch step-size recipe's optimizers (LogAdam on weight steps) per step.

The benchmark net at LSQ W4A4 (``common.quantized_reference``), one thread, interleaved:
``adam`` = one torch Adam on every parameter; ``recipe`` = qatlab's ``make_optimizer`` with
the from-scratch defaults (Adam on weights and activation steps, LogAdam on weight steps).
``recipe-loop`` = the same with LogAdam's former per-parameter Python loop (kept here as
:class:`LoopLogAdam`) instead of its ``torch._foreach_*`` step, so the two are timed side by
side. Prints the median full training step and the median ``optimizer.step()`` alone, in ms.

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
from qatlab.train.optim import LogAdam, make_optimizer


class LoopLogAdam(LogAdam):
    """LogAdam as it was before its ``_foreach`` step: a Python loop over parameters, about ten
    kernel launches each (same numbers, bit for bit)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad * p if group["log"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = m / denom * (group["lr"] / (1 - beta1**t))
                if group["log"]:
                    p.mul_(update.neg_().exp_())
                else:
                    p.sub_(update)


def _logadams(opt) -> list:
    return [sub for sub in getattr(opt, "optimizers", (opt,)) if isinstance(sub, LogAdam)]


def _loop_logadam(opt):
    """``opt`` with every LogAdam inside it stepping through :class:`LoopLogAdam`."""
    for sub in getattr(opt, "optimizers", (opt,)):
        if type(sub) is LogAdam:
            sub.__class__ = LoopLogAdam
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data(64, torch.device("cpu"))
    variants = {}
    for name in ("adam", "recipe", "recipe-loop"):
        model = quantized_reference(x)
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = make_optimizer(model, TrainConfig(lr=1e-3).validate())
            if name == "recipe-loop":
                opt = _loop_logadam(opt)
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
    log_only: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps):
        for name in list(variants)[:: 1 if i % 2 else -1]:  # alternate the order
            model, opt = variants[name]
            t0 = time.perf_counter()
            step(model, opt)
            t1 = time.perf_counter()
            opt.step()  # the same gradients again: the optimizer's own cost
            t2 = time.perf_counter()
            for sub in _logadams(opt):  # LogAdam alone (the weight step sizes)
                sub.step()
            full[name].append(t1 - t0)
            opt_only[name].append(t2 - t1)
            log_only[name].append(time.perf_counter() - t2)
    for name in variants:
        print(
            f"{name:11s} step {statistics.median(full[name]) * 1e3:8.2f} ms   "
            f"optimizer.step {statistics.median(opt_only[name]) * 1e3:6.3f} ms   "
            f"LogAdam.step {statistics.median(log_only[name]) * 1e3:6.3f} ms"
        )
    ratio = statistics.median(full["recipe"]) / statistics.median(full["adam"])
    print(f"recipe / adam, full step: {ratio:.3f}x (median; noisy on a shared machine)")
    for label, times in (("optimizer.step", opt_only), ("LogAdam.step", log_only)):
        pairs = [a / b for a, b in zip(times["recipe"], times["recipe-loop"], strict=True)]
        print(
            f"recipe (foreach LogAdam) / recipe-loop, {label}: "
            f"{statistics.median(pairs):.3f}x (median of step-by-step ratios)"
        )


if __name__ == "__main__":
    main()
