"""BatchNorm re-estimation as a measure: test accuracy after recomputing the running statistics
on training batches, and how far they moved (Nagel et al.: QAT leaves them stale)."""

from __future__ import annotations

from typing import Any

from qatlab.measure.accuracy import evaluate
from qatlab.measure.registry import Column, MeasureContext, register_measure


@register_measure(
    "bn_reestimate",
    columns=[
        Column("acc_bn", "test acc % (BN re-est.)"),
        Column("bn_mean_err", "BN mean err %", better=None, section="oscillation", order=1),
        Column("bn_var_err", "BN var err %", better=None, section="oscillation", order=1),
    ],
)
def bn_reestimate(ctx: MeasureContext, batches: int = 50, seed: int = 1) -> dict[str, Any]:
    """Test accuracy after re-estimating BatchNorm statistics on ``batches`` shuffled training
    batches, and how far the running mean/var moved (relative L2, averaged over BN layers)."""
    from qatlab.data import make_loader
    from qatlab.quant import reestimate_bn

    model = ctx.model()
    loader = make_loader(ctx.data.train_eval, ctx.batch_size, shuffle=True, seed=seed)
    report = reestimate_bn(model, loader, batches)
    return {
        "acc_bn": evaluate(model, ctx.data.test, 512)["acc"],
        "bn_mean_err": _avg([r["mean"] for r in report.values()]),
        "bn_var_err": _avg([r["var"] for r in report.values()]),
    }


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
