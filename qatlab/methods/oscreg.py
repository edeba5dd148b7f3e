"""Oscillation regularization + PTQ (Wenshøj et al., TMLR 2025).

Train in full precision with ``lambda * sum_layers agg(q(W)^2 - W^2)``, then quantize after
training (round-to-nearest PTQ) at the target bit width. ``q`` is the max-abs quantizer on the
restricted grid (ternary at 2 bits): ``q(W) = s * round(W/s)``, ``s = max|W| / p``, with a
straight-through estimator for ``round``.

The gradient of one layer's term ``mean(q(W)^2 - W^2)`` (N = numel, u = W/s):

- ``step_grad=True`` (default; the authors' code, where ``s`` is not detached)::

      dR/dW_i = 2 (q_i - W_i) / N
                + [i = argmax|W|] * sign(W_i) / p * (2/N) * sum_j q_j (round(u_j) - u_j)

  The first part pushes every weight away from its bin centre (the negative of Nagel's
  dampening gradient). The second lands on the layer's largest-magnitude weight only; it is
  ~10-1000x larger than a typical per-weight term and shrinks the range ``max|W|``, so the grid
  gets finer relative to the bulk of the weights. On MNIST-1D MLPs it is most of the effect.
- ``step_grad=False`` (the ablation: step held constant)::

      dR/dW_i = 2 (q_i - W_i) / N

Aggregation ``mean`` (the authors') divides by each layer's own N, so a weight of a 128x128
layer is pulled ~13x less than one of a 128x10 head. ``uniform`` weights layer ``l`` by
``N_l / N_avg`` (N_avg: mean size of the regularized layers): every weight is pulled equally
and ``lambda`` keeps the scale of ``mean`` for a model of equal-sized layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.measure.crossbit import ptq_accuracy
from qatlab.methods.base import Hook
from qatlab.methods.oscillation import bin_distance
from qatlab.methods.registry import register_method
from qatlab.quant.layers import QuantLayer
from qatlab.quant.quantizer import GRIDS, Quantizer

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
REG_AGGREGATIONS = ("mean", "uniform")


class OscillationRegularizer(nn.Module, Hook):
    """Loss term ``lambda * sum_layers agg(q(W)^2 - W^2)`` on a float (or quantized) model.

    ``q`` is a max-abs quantizer on the restricted grid at ``target_bits`` (ternary at 2) by
    default, with the gradient through ``s = max|W|/p`` (``step_grad=True``, the authors'
    code) or with ``s`` held constant (``step_grad=False``); see the module docstring for both
    gradients. ``grid="lsq"`` uses each layer's own LSQ weight quantizer instead (the model
    must be quantized; its learned step is held constant and never trained by this term).
    Only Conv/Linear weights that ran in the last forward pass are regularized (norm layers
    and unused layers never are), and only in training mode.

    ``stats_every > 0`` logs per layer, every that many steps (from :meth:`after_step`):
    ``reg_ratio/<layer>`` = ||lambda * dR/dW|| / ||task gradient||, ``bin_pos/<layer>`` = mean
    ``|W/s - round(W/s)|`` (0.25 for weights spread uniformly, 0.5 when all sit at bin edges)
    and ``max_std/<layer>`` = ``max|W| / std(W)``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_bits: int = 3,
        lam: float = 1.0,
        grid: str = "restricted",
        only_used: bool = True,
        step_grad: bool = True,
        aggregation: str = "mean",
        stats_every: int = 0,
    ) -> None:
        super().__init__()
        if aggregation not in REG_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {REG_AGGREGATIONS}, got {aggregation!r}")
        self.lam = lam
        self.grid = grid
        self.target_bits = target_bits
        self.only_used = only_used
        self.step_grad = step_grad and grid != "lsq"
        self.aggregation = aggregation
        self.stats_every = stats_every
        self.layers: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)
        }
        sizes = [m.weight.numel() for m in self.layers.values()]
        self._mean_size = sum(sizes) / max(len(sizes), 1)
        self.quantizers = nn.ModuleDict()
        scale = "maxabs_ste" if self.step_grad else "maxabs"
        for name, layer in self.layers.items():
            if grid == "lsq":
                if not isinstance(layer, QuantLayer):
                    raise ValueError("grid='lsq' needs a quantized model (qatlab.quantize)")
                continue
            self.quantizers[name.replace(".", "__")] = Quantizer(
                target_bits, signed=True, grid=grid, scale=scale, role="weight"
            ).to(layer.weight.device)  # its buffers beside the weights, wherever they live
        self._used: set[str] = set()
        self._reg_grads: dict[str, Tensor] = {}
        self._handles = [
            layer.register_forward_pre_hook(lambda mod, inp, name=name: self._used.add(name))
            for name, layer in self.layers.items()
        ]

    def quantizer(self, name: str) -> Quantizer:
        if self.grid == "lsq":
            return self.layers[name].weight_quantizer
        return self.quantizers[name.replace(".", "__")]

    def layer_term(self, name: str) -> Tensor:
        """One layer's ``agg(q(W)^2 - W^2)`` with the gradient of the chosen variant."""
        w = self.layers[name].weight
        if self.grid == "lsq":  # constant learned step, in the form shared with dampening
            term = -bin_distance(w, self.quantizer(name), "mean")
        else:
            term = (self.quantizer(name)(w).pow(2) - w.pow(2)).mean()
        if self.aggregation == "uniform":
            term = term * (w.numel() / self._mean_size)
        return term

    def penalty(self, names: list[str] | None = None) -> Tensor:
        """``sum_layers agg(q(W)^2 - W^2)`` over ``names`` (default: all layers)."""
        names = list(self.layers) if names is None else names
        terms = [self.layer_term(n) for n in names]
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

    def _stats_step(self, step: int) -> bool:
        return self.stats_every > 0 and step % self.stats_every == 0

    def loss_term(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        if not model.training or self.lam == 0:
            self._used.clear()
            return None
        names = [n for n in self.layers if n in self._used] if self.only_used else list(self.layers)
        self._used.clear()
        if not names:
            return None
        term = self.lam * self.penalty(names)
        if self._stats_step(step) and term.requires_grad:
            weights = [self.layers[n].weight for n in names]
            grads = torch.autograd.grad(term, weights, retain_graph=True, allow_unused=True)
            self._reg_grads = {
                n: g.detach().clone() for n, g in zip(names, grads, strict=True) if g is not None
            }
        return term

    @torch.no_grad()
    def layer_stats(self) -> dict[str, float]:
        """Per layer: mean position inside the bin and ``max|W| / std(W)`` (see the class)."""
        out: dict[str, float] = {}
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            u = w / self.quantizer(name).broadcast_step(w)
            out[f"bin_pos/{name}"] = float((u - u.round()).abs().mean())
            std = float(w.std()) if w.numel() > 1 else 0.0
            out[f"max_std/{name}"] = float(w.abs().max()) / std if std > 0 else 0.0
        return out

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        if not self._stats_step(step):
            return None
        out = self.layer_stats()
        for name, reg in self._reg_grads.items():
            grad = self.layers[name].weight.grad
            if grad is None:
                continue
            task = float((grad - reg).norm())
            out[f"reg_ratio/{name}"] = float(reg.norm()) / task if task > 0 else float("inf")
        self._reg_grads = {}
        return out


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


def _check(aggregation: str, grid: str, **_: Any) -> None:
    """One-line ConfigErrors for impossible options of ``oscreg`` (the registry runs it)."""
    if aggregation not in REG_AGGREGATIONS:
        raise ConfigError(
            f"method.aggregation must be one of {', '.join(REG_AGGREGATIONS)}, got {aggregation!r}"
        )
    if grid not in (*GRIDS, "lsq"):
        raise ConfigError(f"method.grid must be one of {', '.join(GRIDS)}, lsq; got {grid!r}")


@register_method(
    "oscreg", aliases={"lambda": "lam", "lambda_": "lam"}, needs_quant=False, check=_check
)
def _oscreg(
    model,
    quant,
    total_steps,
    target_bits: int = 3,
    lam: float = 1.0,
    grid: str = "restricted",
    step_grad: bool = True,
    aggregation: str = "mean",
    stats_every: int = 0,
) -> list[Hook]:
    """Float training with the oscillation regularizer, then PTQ (Wenshøj et al. 2025).

    step_grad: gradient through s = max|W|/p as in the authors' code (False: s held constant).
    aggregation: mean (per layer, the authors') or uniform (every weight pulled equally).
    stats_every: log per-layer regularizer statistics every that many steps (0: never).
    """
    reg = OscillationRegularizer(
        model,
        target_bits,
        lam,
        grid,
        step_grad=step_grad,
        aggregation=aggregation,
        stats_every=stats_every,
    )
    return [reg, PTQAccuracy(target_bits)]
