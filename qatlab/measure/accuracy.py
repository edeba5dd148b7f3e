"""Accuracy and loss of a model on a dataset: the measurement every other one starts from."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qatlab.measure.registry import Column, MeasureContext, register_column, register_measure

# the columns of every run's summary (the training loop records them)
register_column(Column("test_acc", "test acc %"))
register_column(Column("wall_time_s", "train time s", scale=1.0, better=None, order=1))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, batch_size: int = 512, device: torch.device | None = None
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and accuracy ``acc`` of ``model`` on ``dataset`` (eval mode)."""
    from qatlab.data import make_loader

    was_training = model.training
    model.eval()
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in make_loader(dataset, batch_size, shuffle=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    if count == 0:
        return {"loss": math.nan, "acc": math.nan}
    return {"loss": float(loss) / count, "acc": float(correct) / count}


# ----------------------------------------------------------------------------- the measure
def _final_label(rest: str) -> str | None:
    """``final_<key>``: the column of ``<key>`` with a 'final:' header (a follow-up run with
    ``checkpoint: final`` or ``both``), or None if ``<key>`` is no column."""
    from qatlab.measure.registry import column_for

    entry = column_for(rest)
    return None if entry is None else f"final: {entry[1]}"


register_column(Column("final_", "final: {}", label=_final_label, order=1, of_rest=True))


@register_measure("accuracy")
def accuracy(ctx: MeasureContext, batch_size: int = 512) -> dict[str, float]:
    """Test and validation accuracy and loss of the measured model (``test_acc``, ``test_loss``,
    ``val_acc``, ``val_loss``): with ``checkpoint: final``, the last epoch's numbers."""
    model = ctx.model()
    out = {}
    for split in ("test", "val"):
        dataset = getattr(ctx.data, split, None)
        if dataset is not None and len(dataset):
            res = evaluate(model, dataset, batch_size)
            out.update({f"{split}_acc": res["acc"], f"{split}_loss": res["loss"]})
    return out
