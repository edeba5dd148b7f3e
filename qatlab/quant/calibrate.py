"""Step sizes from data: ``calibrate`` (activation statistics) and ``ptq`` (post-training)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor, nn

from qatlab.errors import ConfigError
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
    calibrated again. A float model, a negative ``num_batches``, or no batches for a model
    with activation quantizers raise :class:`qatlab.ConfigError`.
    """
    return _calibrate(qmodel, batches, num_batches, weights, "calibrate(qmodel, batches)")


def _calibrate(
    qmodel: nn.Module, batches: Iterable, num_batches: int | None, weights: bool, call: str
) -> nn.Module:
    _check_num_batches(num_batches, call)
    if not isinstance(qmodel, nn.Module) or not any(True for _ in quantizers(qmodel)):
        raise ConfigError(
            f"{call}: the model has no quantizers; quantize it first "
            "(qmodel = qatlab.quantize(model, config)) and calibrate qmodel"
        )
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
    seen = 0
    try:
        for batch in islice(batches, num_batches):
            qmodel(batch_inputs(batch).to(device))
            seen += 1
    finally:
        for q in acts:
            q.finish_observing()
        for m, state in fresh_bn:
            m.load_state_dict(state)
    if acts and not seen:
        qmodel.train(was_training)
        raise ConfigError(
            f"{call}: batches gave no data, but {len(acts)} activation quantizers need it to "
            "set their step sizes; pass a few training batches, e.g. "
            "itertools.islice(train_loader, 4) (an empty list is enough only for weights-only "
            "configs)"
        )
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
    """Post-training quantization: a calibrated quantized copy in eval mode; original untouched.

    ``calib_batches`` may be empty only when ``config`` quantizes no activations (weights
    only); otherwise the activation step sizes need data and an empty one is an error.
    """
    _check_num_batches(num_batches, "ptq(..., num_batches)")
    qmodel = quantize(float_model, config)
    _calibrate(qmodel, calib_batches, num_batches, True, "ptq(float_model, config, calib_batches)")
    return qmodel.eval()


def _check_num_batches(num_batches: int | None, call: str) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(
            f"{call}: num_batches must be a positive integer (batches to use) or None (all of "
            f"them); got {num_batches!r}"
        )
