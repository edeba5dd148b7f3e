"""Generalization gap: training vs test accuracy and loss, both un-augmented and in eval mode."""

from __future__ import annotations

from torch import nn

from qatlab.measure.accuracy import evaluate


def generalization_gap(
    model: nn.Module, train_set, test_set, batch_size: int = 512
) -> dict[str, float]:
    """``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``, ``gap_acc = train_acc -
    test_acc`` and ``gap_loss = test_loss - train_loss`` (positive = overfitting).

    ``train_set`` must be the un-augmented training samples (``DataBundle.train_eval``), so
    the gap measures memorisation and not the augmentation. The model is evaluated in eval mode
    (:func:`qatlab.measure.evaluate`) and left as it was.
    """
    train = evaluate(model, train_set, batch_size)
    test = evaluate(model, test_set, batch_size)
    return {
        "train_acc": train["acc"],
        "test_acc": test["acc"],
        "train_loss": train["loss"],
        "test_loss": test["loss"],
        "gap_acc": train["acc"] - test["acc"],
        "gap_loss": test["loss"] - train["loss"],
    }
