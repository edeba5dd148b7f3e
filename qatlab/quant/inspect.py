"""Inspection: per-layer bit widths, step sizes and integer weights of a quantized model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from qatlab.quant.layers import quant_layers
from qatlab.quant.quantizer import DYNAMIC_POLICIES


@dataclass
class LayerInfo:
    """What one quantized layer holds; later measures (oscillations, bin widths) read these."""

    name: str
    kind: str
    weight_bits: int
    weight_grid: tuple[int, int]
    weight_step: Tensor
    weight_int: Tensor
    act_bits: int | None
    act_grid: tuple[int, int] | None
    act_step: Tensor | None
    num_weights: int

    def row(self) -> dict:
        """A flat, JSON-friendly summary."""
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_bits": self.weight_bits,
            "weight_grid": list(self.weight_grid),
            "weight_step": float(self.weight_step.float().mean()),
            "act_bits": self.act_bits,
            "act_step": None if self.act_step is None else float(self.act_step.float().mean()),
            "num_weights": self.num_weights,
        }


def inspect(qmodel: nn.Module) -> list[LayerInfo]:
    """One :class:`LayerInfo` per quantized layer, in registration order."""
    infos = []
    for name, layer in quant_layers(qmodel):
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        infos.append(
            LayerInfo(
                name=name,
                kind=type(layer).__name__,
                weight_bits=wq.bits,
                weight_grid=wq.grid_range,
                weight_step=wq.current_step(layer.weight).detach().clone(),
                weight_int=layer.weight_int().to(dtype=_int_dtype(wq.grid_range)),
                act_bits=None if aq is None else aq.bits,
                act_grid=None if aq is None else aq.grid_range,
                act_step=None
                if aq is None or aq.policy in DYNAMIC_POLICIES
                else aq.step.detach().clone(),
                num_weights=layer.weight.numel(),
            )
        )
    return infos


def _int_dtype(grid: tuple[int, int]):
    import torch

    return torch.int8 if grid[0] >= -128 and grid[1] <= 127 else torch.uint8
