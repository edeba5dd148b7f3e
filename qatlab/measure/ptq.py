"""Post-training quantization sweep: a model's accuracy post-training quantized at several bit
widths (calibrated on a few training batches), next to its float (and as-trained) accuracy."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from qatlab.errors import ConfigError
from qatlab.measure.accuracy import evaluate
from qatlab.measure.registry import Column, MeasureContext, register_measure
from qatlab.quant import QuantConfig, dequantize, is_quantized, ptq, reestimate_bn

SPLITS = {"test": "test", "val": "val", "train": "train_eval"}


def split_dataset(data, split: str):
    """The dataset of ``split`` (``test``, ``val`` or ``train``: the un-augmented training
    samples) of a :class:`qatlab.data.DataBundle`."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of test, val, train; got {split!r}")
    return getattr(data, SPLITS[split])


def calib_loader(data, batch_size: int):
    """Shuffled (seed 0) un-augmented training batches: what PTQ and BN re-estimation use."""
    from qatlab.data import make_loader

    return make_loader(data.train_eval, batch_size, shuffle=True, seed=0, epoch=0)


def ptq_sweep(
    model: nn.Module,
    data,
    bits: Sequence[int],
    *,
    act_bits: int | str | None = "same",
    split: str = "test",
    calib_batches: int = 4,
    batch_size: int = 512,
    bn_reestimate: bool = False,
    quant_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{method, bits, weight_bits, act_bits, acc, loss, time_s}``: the float model,
    then the model post-training quantized at each bit width (calibrated on
    ``calib_batches`` training batches). ``act_bits``: ``"same"`` as the weights, a fixed
    width, or ``None`` for weights only. A QAT model is first turned back into its latent
    float model, and also reported as trained."""
    dataset = split_dataset(data, split)
    rows = []
    if is_quantized(model):
        start = time.perf_counter()
        res = evaluate(model, dataset, batch_size)
        rows.append(_row("trained", "trained", None, None, res, start))
        model = dequantize(model)
    start = time.perf_counter()
    rows.append(_row("float", "float", None, None, evaluate(model, dataset, batch_size), start))
    for b in bits:
        a = b if act_bits == "same" else act_bits
        cfg = QuantConfig.from_dict(
            {"weight_bits": b, "act_bits": a, "weights_only": a is None, **(quant_options or {})}
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = ptq(model, cfg, calib_loader(data, batch_size), calib_batches)
        if bn_reestimate:
            reestimate_bn(qmodel, calib_loader(data, batch_size), 50)
        res = evaluate(qmodel, dataset, batch_size)
        rows.append(_row("ptq", cfg.describe(), b, a, res, start))
    return rows


def _row(method: str, bits: str, wbits, abits, res: dict, start: float) -> dict[str, Any]:
    return {
        "method": method,
        "bits": bits,
        "weight_bits": wbits,
        "act_bits": abits,
        "acc": res["acc"],
        "loss": res["loss"],
        "time_s": round(time.perf_counter() - start, 3),
    }


@register_measure("ptq", columns=[Column("ptq_", "PTQ {} %", section="crossbit")])
def ptq_measure(
    ctx: MeasureContext,
    bits: list = (2, 3, 4, 8),
    act_bits: Any = "same",
    bn_reestimate: bool = False,
    calib_batches: int = 4,
    quant: dict | None = None,
) -> dict[str, Any]:
    """Test accuracy of the trained model's (latent) float weights post-training quantized at
    each width (:func:`ptq_sweep`): keys ``ptq_W4A4`` etc."""
    rows = ptq_sweep(
        ctx.model(),
        ctx.data,
        list(bits),
        act_bits=act_bits,
        calib_batches=calib_batches,
        bn_reestimate=bn_reestimate,
        quant_options=quant,
    )
    return {f"ptq_{r['bits']}": r["acc"] for r in rows if r["method"] == "ptq"}
