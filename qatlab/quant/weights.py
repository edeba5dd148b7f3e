"""A handle on quantized weights: keep ``q(w)`` and its gradient for one pass, or run a forward
pass at ``q(w) + delta``. What sharpness-aware methods (SAQ) and flatness measures need.

Neither touches latent weights or step sizes, and both always restore the layers, exceptions
included::

    with keep_quantized_weights(qmodel) as kept:
        loss_fn(qmodel(x), y).backward()
    grads = kept.grads()                  # {layer name: dL/dq(w)}, not the STE latent gradient

    with perturbed_weights(qmodel, {name: rho * g / norm for name, g in grads.items()}):
        loss_fn(qmodel(x), y).backward()  # gradient at q(w) + e, flowing to w through the STE
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.quant.layers import QuantLayer, quant_layers


class KeptWeights:
    """The ``q(w)`` tensors of the last forward pass inside :func:`keep_quantized_weights`."""

    def __init__(self, layers: dict[str, QuantLayer]) -> None:
        self.layers = layers

    def tensors(self) -> dict[str, Tensor]:
        """``{name: q(w)}`` as used by the last forward (layers that did not run are absent)."""
        return {n: m.kept_qweight for n, m in self.layers.items() if m.kept_qweight is not None}

    def grads(self) -> dict[str, Tensor]:
        """``{name: dL/dq(w)}`` after ``backward``: the gradient w.r.t. the quantized weight,
        non-zero also where the weight is clipped (the STE latent gradient is zero there)."""
        out = {}
        for name, w in self.tensors().items():
            if w.grad is not None:
                out[name] = w.grad
        return out


def _layers(model: nn.Module, names: list[str] | None) -> dict[str, QuantLayer]:
    layers = dict(quant_layers(model))
    if names is None:
        return layers
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ConfigError(f"not quantized layers of this model: {', '.join(unknown)}")
    return {n: layers[n] for n in names}


@contextlib.contextmanager
def keep_quantized_weights(
    model: nn.Module, names: list[str] | None = None
) -> Iterator[KeptWeights]:
    """Inside the block, every (or each named) quantized layer keeps the ``q(w)`` of its last
    forward pass and, after ``backward``, its gradient. Released on exit."""
    layers = _layers(model, names)
    for m in layers.values():
        m.keep_qweight, m.kept_qweight = True, None
    kept = KeptWeights(layers)
    try:
        yield kept
    finally:
        for m in layers.values():
            m.__dict__.pop("keep_qweight", None)
            w = m.kept_qweight
            if w is not None and not w.is_leaf:  # keep value and gradient, drop the graph
                leaf = w.detach()
                leaf.grad = w.grad
                m.kept_qweight = leaf


def release(kept: KeptWeights) -> None:
    """Drop the kept tensors (and the graph they hold) once their gradients have been read."""
    for m in kept.layers.values():
        m.__dict__.pop("kept_qweight", None)


@contextlib.contextmanager
def perturbed_weights(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Forward passes inside the block use ``q(w) + delta`` for each named quantized layer
    (``delta`` detached: the gradient still reaches ``w`` through the quantizer's STE).
    Latent weights and step sizes are never written; the layers are restored on exit."""
    layers = _layers(model, list(deltas))
    for name, m in layers.items():
        delta = deltas[name]
        if delta.shape != m.weight.shape:
            raise ConfigError(
                f"perturbation of {name} has shape {tuple(delta.shape)}, "
                f"its weight {tuple(m.weight.shape)}"
            )
        m.qweight_delta = delta.detach()
    try:
        yield model
    finally:
        for m in layers.values():
            m.__dict__.pop("qweight_delta", None)


@torch.no_grad()
def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{name: sg[q(w)]}`` of every quantized layer (the weights the forward pass uses)."""
    out = {}
    for name, m in quant_layers(model):
        q = m.weight_quantizer
        out[name] = q.quantize_detached(m.weight) if q.enabled else m.weight.detach().clone()
    return out
