"""Transitions: changes of a weight's integer level between consecutive training steps.

:class:`TransitionCounter` is the one place that compares integers across steps. The
oscillation tracker, iterative freezing, TALR and the trainer's transition-rate log all read
it, per layer and globally: how many integers changed, and in which direction. Its state (the
previous integers) is a buffer, so it survives a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qatlab.quant.layers import QuantLayer, quant_layers


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


@dataclass
class Transitions:
    """One step's transitions. ``current`` integers and ``direction`` (sign of the change, -1/0/1)
    per layer, as int8 tensors; counts are computed on demand."""

    current: dict[str, Tensor]
    direction: dict[str, Tensor]

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """``{layer: (changed, up, down, numel)}``."""
        out = {}
        for name, d in self.direction.items():
            up, down = int((d > 0).sum()), int((d < 0).sum())
            out[name] = (up + down, up, down, d.numel())
        return out

    def rate_tensor(self) -> Tensor:
        """Global transition rate ``k_t`` as a 0-d tensor (no host sync)."""
        changed = sum((d != 0).sum() for d in self.direction.values())
        total = sum(d.numel() for d in self.direction.values())
        return torch.as_tensor(changed, dtype=torch.float32) / max(total, 1)

    def rate(self) -> float:
        """Global transition rate: the share of counted weights whose integer changed."""
        return float(self.rate_tensor())

    def layer_rates(self) -> dict[str, float]:
        return {n: c[0] / max(c[3], 1) for n, c in self.counts().items()}

    def metrics(self, per_layer: bool = False) -> dict[str, float]:
        """``tr`` (global rate), ``tr_up``, ``tr_down`` (shares moving up/down) and, with
        ``per_layer``, ``tr/<layer>``: what the trainer logs."""
        counts = self.counts()
        total = max(sum(c[3] for c in counts.values()), 1)
        out = {
            "tr": sum(c[0] for c in counts.values()) / total,
            "tr_up": sum(c[1] for c in counts.values()) / total,
            "tr_down": sum(c[2] for c in counts.values()) / total,
        }
        if per_layer:
            out.update({f"tr/{n}": c[0] / max(c[3], 1) for n, c in counts.items()})
        return out


def counted_layers(
    model: nn.Module, max_bits: int | None = None, include_pinned: bool = False
) -> list[tuple[str, QuantLayer]]:
    """Quantized layers to count: weights of at most ``max_bits`` (any if None); layers pinned to
    8 bits by the first/last-layer policy only with ``include_pinned`` (or if nothing else)."""
    layers = [
        (n, m)
        for n, m in quant_layers(model)
        if max_bits is None or m.weight_quantizer.bits <= max_bits
    ]
    if include_pinned:
        return layers
    free = [(n, m) for n, m in layers if not m.weight_quantizer.fixed_bits]
    return free or layers


class TransitionCounter(nn.Module):
    """Compares each counted layer's integer weights with those of the previous call.

    Call :meth:`update` once per training step, after ``optimizer.step()``; it returns that
    step's :class:`Transitions`. Calling it again at the same ``step`` returns the same result,
    so several methods can share one counter. The first call after construction compares with
    the integers the model had when the counter was built.
    """

    def __init__(
        self,
        model: nn.Module,
        max_bits: int | None = None,
        include_pinned: bool = False,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        layers = counted_layers(model, max_bits, include_pinned)
        if names is not None:
            layers = [(n, m) for n, m in layers if n in set(names)]
        self.layer_names = [n for n, _ in layers]
        for name, layer in layers:
            self.register_buffer(f"{_key(name)}__prev", layer.weight_int().to(torch.int8))
        self._last: tuple[int, Transitions] | None = None

    def previous(self, name: str) -> Tensor:
        """The integers of ``name`` at the last update."""
        return getattr(self, f"{_key(name)}__prev")

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> Transitions:
        """This step's transitions (computed once per ``step`` when a step is given)."""
        if step is not None and self._last is not None and self._last[0] == step:
            return self._last[1]
        layers = dict(quant_layers(model))
        current, direction = {}, {}
        for name in self.layer_names:
            w_int = layers[name].weight_int().to(torch.int8)
            prev = self.previous(name)
            direction[name] = torch.sign(w_int.to(torch.int16) - prev).to(torch.int8)
            prev.copy_(w_int)
            current[name] = w_int
        result = Transitions(current, direction)
        if step is not None:
            self._last = (step, result)
        return result
