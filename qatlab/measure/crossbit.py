"""Cross-bit evaluation: any trained model, post-training quantized at several bit widths.

Rows of the matrix are training methods (float, QAT at b, regularized at b); columns are the
evaluation bit widths {2, 3, 4, 8} and float. Wenshøj et al. report that regularized models
keep near-float accuracy above their target bit width, where QAT models do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from qatlab.measure.accuracy import evaluate
from qatlab.quant import QuantConfig, dequantize, is_quantized, ptq


def ptq_config(
    bits: int,
    *,
    act_bits: int | None = None,
    grid: str = "restricted",
    scale: str = "maxabs",
    first_last: str = "same",
) -> QuantConfig:
    """Round-to-nearest PTQ as in Wenshøj et al.: weights only, max-abs on the restricted grid
    (ternary at 2 bits), every layer at ``bits`` (``first_last="8bit"`` keeps Nagel's policy)."""
    return QuantConfig(
        weight_bits=bits,
        act_bits=act_bits,
        weights_only=act_bits is None,
        weight_grid=grid,
        weight_scale=scale,
        first_layer=first_last,
        last_layer=first_last,
    )


def cross_bit(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    bits: Sequence[int] = (2, 3, 4, 8),
    config: Callable[[int], QuantConfig] = ptq_config,
    calib_batches: Iterable | None = None,
) -> dict[str, float]:
    """``{"2": acc, ..., "8": acc, "float": acc}`` for ``model`` post-training quantized at each
    bit width (its latent float weights if it is a QAT model, which also gets ``"trained"``:
    its accuracy with the quantizers it was trained with)."""
    float_model = dequantize(model) if is_quantized(model) else model
    calib = list(calib_batches) if calib_batches is not None else []
    results = {str(b): evaluate(ptq(float_model, config(b), calib)) for b in bits}
    results["float"] = evaluate(float_model)
    if is_quantized(model):
        results["trained"] = evaluate(model)
    return results


def ptq_accuracy(model: nn.Module, dataset, bits: int, batch_size: int = 512) -> float:
    """Accuracy of ``model`` (its latent float weights if quantized) after round-to-nearest
    PTQ at ``bits`` (:func:`ptq_config`)."""
    float_model = dequantize(model) if is_quantized(model) else model
    return evaluate(ptq(float_model, ptq_config(bits), []), dataset, batch_size)["acc"]
