"""Step sizes from data: ``calibrate`` (activation statistics) and ``ptq`` (post-training)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor, nn

from qatlab.quant.config import QuantConfig
from qatlab.quant.layers import quant_layers, quantizers
from qatlab.quant.quantize import quantize


def batch_inputs(batch: Tensor | tuple | list) -> Tensor:
    """The input tensor of a batch given as a tensor or an ``(x, y, ...)`` tuple."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(
    qmodel: nn.Module, batches: Iterable, num_batches: int | None = None, weights: bool = True
) -> nn.Module:
    """Initialise every quantizer from data: inputs from ``batches``, weights from themselves.

    Runs the model in eval mode with all quantizers passing values through (float statistics),
    then sets each step by its policy (``lsq`` uses its ``init`` method). BatchNorm layers that
    never saw data (a freshly initialised net) use batch statistics, as training will, and keep
    their running statistics untouched: eval-mode BN with its initial (0, 1) statistics would
    shrink activations layer by layer and give steps that clip almost everything.
    Meant for a freshly quantized model; a trained one keeps its learned steps unless
    calibrated again.
    """
    was_training = qmodel.training
    qmodel.eval()
    fresh_bn = [
        (m, {k: v.clone() for k, v in m.state_dict().items()})
        for m in qmodel.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and int(m.num_batches_tracked) == 0
    ]
    for m, _ in fresh_bn:
        m.train()
    device = _device(qmodel)
    acts = [q for _, q in quantizers(qmodel) if q.role != "weight"]
    for q in acts:
        q.start_observing()
    try:
        for batch in islice(batches, num_batches):
            qmodel(batch_inputs(batch).to(device))
    finally:
        for q in acts:
            q.finish_observing()
        for m, state in fresh_bn:
            m.load_state_dict(state)
    if weights:
        for _, layer in quant_layers(qmodel):
            layer.weight_quantizer.initialize(layer.weight.detach())
    qmodel.train(was_training)
    return qmodel


def ptq(
    float_model: nn.Module,
    config: QuantConfig,
    calib_batches: Iterable,
    num_batches: int | None = None,
) -> nn.Module:
    """Post-training quantization: a calibrated quantized copy in eval mode; original untouched."""
    qmodel = quantize(float_model, config)
    calibrate(qmodel, calib_batches, num_batches)
    return qmodel.eval()
