"""Cross-bit evaluation: any trained model, post-training quantized at several bit widths.

Rows of the matrix are training methods (float, QAT at b, regularized at b); columns are the
evaluation bit widths {2, 3, 4, 8} and float. Wenshøj et al. report that regularized models
keep near-float accuracy above their target bit width, where QAT models do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from qatlab.measure.accuracy import evaluate
from qatlab.measure.registry import Column, MeasureContext, register_measure
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


# ----------------------------------------------------------------------------- the measure
def _xb_label(prefix: str) -> Callable[[str], str]:
    def label(suffix: str) -> str:  # xb_4 -> "PTQ W4, weights only %", xb_float -> "float %"
        if suffix.isdigit():  # activations stay float: not a WbAb number
            return f"{prefix}PTQ W{suffix}, weights only %"
        return f"{prefix}{suffix} %"

    return label


@register_measure(
    "crossbit",
    columns=[
        Column("xb_", "PTQ W{}, weights only %", section="crossbit", label=_xb_label("")),
        Column(
            "xbf_", "final: PTQ W{}, weights only %", section="crossbit", label=_xb_label("final: ")
        ),
    ],
)
def crossbit_measure(
    ctx: MeasureContext, bits: list = (2, 3, 4, 8), final: bool = False
) -> dict[str, Any]:
    """Wenshøj et al.'s cross-bit row (:func:`cross_bit`): weights-only max-abs PTQ on the
    restricted grid at each width, float, and a QAT model as trained (``xb_*``). ``final``:
    also of the last epoch's model (``xbf_*``) when the run ended on its best epoch, so
    early-stopped and final-epoch results come from one run."""
    test = ctx.data.test

    def row(model, prefix: str) -> dict[str, Any]:
        res = cross_bit(model, lambda m: evaluate(m.eval(), test, 512)["acc"], list(bits))
        return {f"{prefix}{k}": v for k, v in res.items()}

    out = row(ctx.model(), "xb_")
    if final:
        last = ctx.final_model()
        if last is not None:
            out.update(row(last.eval(), "xbf_"))
    return out
