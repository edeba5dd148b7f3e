"""Quantized Conv1d / Conv2d / Linear: the float layer plus a weight and an input quantizer.

They subclass the float layers, so ``weight``/``bias`` keep their names and a float state dict
loads into a quantized model (``strict=False`` for the quantizer entries).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.quant.quantizer import Quantizer


class QuantLayer:
    """Mixin: ``weight_quantizer`` (always) and ``input_quantizer`` (``None`` = float input)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer | None
    # set only inside qatlab.quant.weights' context managers (class defaults: off)
    keep_qweight: bool = False  # keep q(w) of the next forward, with its gradient
    kept_qweight: Tensor | None = None
    qweight_delta: Tensor | None = None  # forward at q(w) + delta (no gradient through delta)

    def quantized_weight(self) -> Tensor:
        """The weight as the forward pass uses it: ``q(w)`` (``w`` if disabled), plus
        ``qweight_delta`` inside :func:`qatlab.quant.perturbed_weights`."""
        w = self.weight_quantizer(self.weight)
        if self.qweight_delta is not None:
            w = w + self.qweight_delta
        if self.keep_qweight:
            if w.requires_grad and not w.is_leaf:
                w.retain_grad()
            self.kept_qweight = w
        return w

    def weight_int(self) -> Tensor:
        """Integer view of the weight, from the weight quantizer."""
        return self.weight_quantizer.integer(self.weight)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def from_float(
        cls, layer: nn.Module, weight_quantizer: Quantizer, input_quantizer: Quantizer | None
    ) -> QuantLayer:
        """Wrap ``layer``'s own parameters (shared, not copied) with the given quantizers."""
        new = recast(layer, cls)
        new.weight_quantizer = weight_quantizer.to(layer.weight.device)
        new.input_quantizer = (
            None if input_quantizer is None else input_quantizer.to(layer.weight.device)
        )
        return new


def recast(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance sharing ``layer``'s parameters, buffers, hooks and settings (no copy);
    quantizer submodules are left behind (``from_float`` adds new ones)."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._modules = {k: v for k, v in layer._modules.items() if not isinstance(v, Quantizer)}
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new.__dict__.pop("input_quantizer", None)  # set as a plain attribute when it is None
    return new


class QuantConv1d(QuantLayer, nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


FLOAT_TO_QUANT: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def quant_layers(model: nn.Module):
    """Yield ``(name, layer)`` for every quantized layer of ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def quantizers(model: nn.Module):
    """Yield ``(name, quantizer)`` for every :class:`Quantizer` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` holds at least one quantized layer."""
    return any(True for _ in quant_layers(model))
