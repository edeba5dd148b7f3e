"""BatchNorm re-estimation: repair running statistics that oscillating weights corrupted."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from qatlab.quant.calibrate import _device, batch_inputs

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, n: int = 50) -> dict[str, dict[str, float]]:
    """Recompute every BatchNorm's running mean/var as the cumulative average over ``n`` batches.

    Only BN layers run in train mode; everything else (dropout, quantizers, trackers) is in eval
    mode, so nothing else changes. Returns, per BN layer, the relative L2 change of the running
    mean and variance (old vs re-estimated): a measure of how stale the statistics were.
    """
    bns = {
        name: m for name, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats
    }
    if not bns:
        return {}
    was_training = model.training
    old = {
        name: (m.running_mean.clone(), m.running_var.clone(), m.momentum) for name, m in bns.items()
    }
    model.eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
        m.train()
    device = _device(model)
    seen = 0
    try:
        for batch in islice(batches, n):
            model(batch_inputs(batch).to(device))
            seen += 1
    finally:
        for name, m in bns.items():
            m.momentum = old[name][2]
        model.train(was_training)
    if seen == 0:
        for name, m in bns.items():  # nothing to estimate from: keep the old statistics
            m.running_mean.copy_(old[name][0])
            m.running_var.copy_(old[name][1])
        return {}
    report = {}
    for name, m in bns.items():
        mean0, var0, _ = old[name]
        report[name] = {
            "mean": float((m.running_mean - mean0).norm() / m.running_mean.norm().clamp_min(1e-12)),
            "var": float((m.running_var - var0).norm() / m.running_var.norm().clamp_min(1e-12)),
        }
    return report
