"""Oscillation regularization + PTQ (Wenshøj et al., TMLR 2025).

Train in full precision with ``lambda * sum_layers mean(q(W)^2 - W^2)``, a term whose STE
gradient ``2 (q(W) - W) / numel`` mimics the push QAT gives weights away from their bin centre,
then quantize after training (round-to-nearest PTQ) at the target bit width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qatlab.measure.crossbit import ptq_accuracy
from qatlab.methods import register_method
from qatlab.methods.base import Hook
from qatlab.methods.oscillation import bin_distance
from qatlab.quant.layers import QuantLayer
from qatlab.quant.quantizer import Quantizer

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


class OscillationRegularizer(nn.Module, Hook):
    """Loss term ``lambda * sum_layers mean(q(W)^2 - W^2)`` on a float (or quantized) model.

    ``q`` is a max-abs quantizer on the restricted grid at ``target_bits`` (ternary at 2) by
    default; ``grid="lsq"`` uses each layer's own LSQ weight quantizer instead (model must be
    quantized). Computed in the gradient-equivalent form ``-mean((sg[q(W)] - W)^2)`` shared
    with dampening: the same gradient as R under the STE, with the opposite sign of dampening.
    Only Conv/Linear weights that ran in the last forward pass are regularized (norm layers
    and unused layers never are), and only in training mode.
    """

    def __init__(
        self,
        model: nn.Module,
        target_bits: int = 3,
        lam: float = 1.0,
        grid: str = "restricted",
        only_used: bool = True,
    ) -> None:
        super().__init__()
        self.lam = lam
        self.grid = grid
        self.target_bits = target_bits
        self.only_used = only_used
        self.layers: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)
        }
        self.quantizers = nn.ModuleDict()
        for name, layer in self.layers.items():
            if grid == "lsq":
                if not isinstance(layer, QuantLayer):
                    raise ValueError("grid='lsq' needs a quantized model (qatlab.quantize)")
                continue
            self.quantizers[name.replace(".", "__")] = Quantizer(
                target_bits, signed=True, grid=grid, scale="maxabs", role="weight"
            )
        self._used: set[str] = set()
        self._handles = [
            layer.register_forward_pre_hook(lambda mod, inp, name=name: self._used.add(name))
            for name, layer in self.layers.items()
        ]

    def quantizer(self, name: str) -> Quantizer:
        if self.grid == "lsq":
            return self.layers[name].weight_quantizer
        return self.quantizers[name.replace(".", "__")]

    def penalty(self, names: list[str] | None = None) -> Tensor:
        """``sum_layers -mean((sg[q(W)] - W)^2)`` over ``names`` (default: all layers)."""
        names = list(self.layers) if names is None else names
        terms = [-bin_distance(self.layers[n].weight, self.quantizer(n), "mean") for n in names]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def value(self) -> float:
        """R itself, ``sum_layers mean(q(W)^2 - W^2)``, for logging."""
        total = 0.0
        for name, layer in self.layers.items():
            w = layer.weight
            total += float(
                self.quantizer(name).quantize_detached(w).pow(2).mean() - w.pow(2).mean()
            )
        return total

    def loss_term(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        if not model.training or self.lam == 0:
            self._used.clear()
            return None
        names = [n for n in self.layers if n in self._used] if self.only_used else None
        self._used.clear()
        return self.lam * self.penalty(names)


class PTQAccuracy(Hook):
    """Evaluation-time metric ``ptq{b}_acc``: accuracy after round-to-nearest PTQ at ``bits``.

    Lets early stopping and model selection use the quantized validation accuracy of a model
    trained in float (Wenshøj et al.'s protocol): ``train.early_stop_metric=val_ptq3_acc``.
    """

    def __init__(self, bits: int, batch_size: int = 512) -> None:
        self.bits = bits
        self.batch_size = batch_size

    def eval_metrics(self, model: nn.Module, data, split: str) -> dict | None:
        acc = ptq_accuracy(model, getattr(data, split), self.bits, self.batch_size)
        return {f"ptq{self.bits}_acc": acc}


@register_method("oscreg", aliases={"lambda": "lam", "lambda_": "lam"}, needs_quant=False)
def _oscreg(
    model, quant, total_steps, target_bits: int = 3, lam: float = 1.0, grid: str = "restricted"
) -> list[Hook]:
    """Float training with the oscillation regularizer, then PTQ (Wenshøj et al. 2025)."""
    return [OscillationRegularizer(model, target_bits, lam, grid), PTQAccuracy(target_bits)]
