"""Step-size guard: no optimizer update drives a learned LSQ step size to zero or below.

A step size trained by a plain optimizer at the weights' learning rate (``SGD(qmodel.
parameters(), lr=0.01)``) can go negative in a few updates; the quantizer then clamps it to
1e-8, every weight sits at the clip and the layer is dead without a word. :func:`watch`
(called by :func:`qatlab.quantize` for every learned step) marks the step parameters; an
optimizer step hook, installed once for all ``torch.optim`` optimizers, then keeps each marked
step at no less than :data:`FLOOR` times its value before the update and warns once, naming
the layer, the first time that bound holds one. Outside the quantizer's kernel: two
``torch._foreach_*`` calls per optimizer step on the (few, tiny) step tensors; the check for
the warning reads the values every step on the CPU (no device sync there) and every
:data:`ACCEL_CHECK_EVERY` steps on an accelerator. Nothing changes for an update that shrinks a step
by less than 10x (every recipe of qatlab: LogAdam moves a step by ~0.5% per update).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

FLOOR = 0.1  # an update keeps a step size at >= FLOOR x its value before the update
ACCEL_CHECK_EVERY = 50  # on an accelerator, steps between reads of the hits (a host sync)
_ATTR = "_qatlab_step_of"  # set on a watched step parameter: the layer's name

_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _Plan
_installed = False


class _Plan:
    """The watched step parameters of one optimizer, their pre-update floors and a counter."""

    def __init__(self, signature: tuple[int, int], params: list[Tensor]) -> None:
        self.signature = signature
        self.params = params
        self.floors: list[Tensor] | None = None
        self.hits: list[Tensor] | None = None  # accelerators: collapses not yet read
        self.calls = 0


def watch(layer: str, role: str, quantizer: nn.Module) -> None:
    """Guard the learned step of ``quantizer``, the ``role`` ("weight" or "input") quantizer
    of the layer named ``layer``, in every optimizer."""
    quantizer._guard_label = f"{role} step size of layer {layer!r}"
    mark(quantizer)


def mark(quantizer: nn.Module) -> None:
    """Mark the quantizer's step parameter as watched; also for a deep copy or an unpickled
    model (``Quantizer.__setstate__``), whose new parameters would otherwise go unguarded."""
    label = getattr(quantizer, "_guard_label", None)
    step = quantizer._parameters.get("step")
    if label is not None and step is not None:
        setattr(step, _ATTR, label)
        _install()


def _install() -> None:
    global _installed
    if not _installed:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        register_optimizer_step_pre_hook(_before)
        register_optimizer_step_post_hook(_after)
        _installed = True


def _plan(optimizer: torch.optim.Optimizer) -> _Plan:
    groups = optimizer.param_groups
    signature = (len(groups), sum(len(g["params"]) for g in groups))
    plan = _plans.get(optimizer)
    if plan is None or plan.signature != signature:
        params = [p for g in groups for p in g["params"] if hasattr(p, _ATTR)]
        plan = _Plan(signature, params)
        _plans[optimizer] = plan
    return plan


def _before(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    plan = _plan(optimizer)
    if plan.params:
        with torch.no_grad():
            plan.floors = torch._foreach_mul(plan.params, FLOOR)


def _after(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    plan = _plans.get(optimizer)
    if plan is None or not plan.params or plan.floors is None:
        return
    with torch.no_grad():
        torch._foreach_maximum_(plan.params, plan.floors)
    plan.calls += 1
    if plan.params[0].device.type == "cpu":  # reading a CPU value is no device sync: every step
        _check_all(plan.params, plan.floors)
    else:  # accelerators: collect the hits on the device, read them every ACCEL_CHECK_EVERY steps
        hits = [p <= f for p, f in zip(plan.params, plan.floors, strict=True)]
        plan.hits = hits if plan.hits is None else torch._foreach_maximum(plan.hits, hits)
        if plan.calls % ACCEL_CHECK_EVERY == 0:
            _check(plan.params, plan.hits)
            plan.hits = None
    plan.floors = None


def _check_all(params: list[Tensor], floors: list[Tensor]) -> None:
    """CPU: one test for all steps (a few ops, not three per step): after the maximum every
    step clear of its floor has ``p - floor > 0``; only if one has not (held, NaN, or a gap
    flushed to zero) the exact per-step ``p <= floor``."""
    gaps = torch._foreach_sub(params, floors)
    if not bool(torch.cat([g.reshape(-1) for g in gaps]).gt(0).all()):
        _check(params, [p <= f for p, f in zip(params, floors, strict=True)])


def _check(params: list[Tensor], hits: list[Tensor]) -> None:
    for p, hit in zip(params, hits, strict=True):
        name = getattr(p, _ATTR)
        if name is not None and bool(hit.any()):
            setattr(p, _ATTR, None)  # warned: once per step size
            _warn(name, p)


def _warn(name: str, step: Tensor) -> None:
    warnings.warn(
        f"qatlab: an optimizer update tried to shrink the {name} by more "
        f"than {1 / FLOOR:g}x (toward zero or below); it was kept positive (now "
        f"{float(step.detach().min()):.3g}). The step sizes train at the weights' learning "
        "rate: build the optimizer with qatlab.optimizer(qmodel, ...), which gives them their "
        "own group (Adam on log s)",
        RuntimeWarning,
        stacklevel=3,
    )
