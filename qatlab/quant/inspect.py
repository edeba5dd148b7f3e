"""Inspection: a per-layer summary of a quantized model that prints as a table.

``print(qatlab.inspect(qmodel))`` shows one line per quantized layer (bits, grid, granularity,
step size range, share of weights at the clip, oscillating share when a tracker is given);
the integer weights and step tensors are there on request (``tensors=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.quant.layers import quant_layers
from qatlab.quant.quantizer import DYNAMIC_POLICIES


@dataclass
class LayerInfo:
    """What one quantized layer holds; the tensors only when asked for (``tensors=True``)."""

    name: str
    kind: str
    weight_bits: int
    weight_grid: tuple[int, int]
    granularity: str  # "tensor" or "channel"
    step_min: float
    step_max: float
    clip_share: float  # weights whose integer sits at n or p
    act_bits: int | None
    act_grid: tuple[int, int] | None
    act_step: float | None  # None: no activation quantizer, or a dynamic (max-abs) one
    num_weights: int
    osc_share: float | None = None  # with a tracker: weights whose frequency passes its threshold
    weight_step: Tensor | None = field(default=None, repr=False)
    weight_int: Tensor | None = field(default=None, repr=False)

    def row(self) -> dict:
        """A flat, JSON-friendly summary (no tensors)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_bits": self.weight_bits,
            "weight_grid": list(self.weight_grid),
            "granularity": self.granularity,
            "step_min": self.step_min,
            "step_max": self.step_max,
            "clip_share": self.clip_share,
            "osc_share": self.osc_share,
            "act_bits": self.act_bits,
            "act_step": self.act_step,
            "num_weights": self.num_weights,
        }


class Inspection(list):
    """The :class:`LayerInfo` of every quantized layer; ``str()`` is a table."""

    def rows(self) -> list[dict]:
        return [info.row() for info in self]

    def table(self) -> str:
        """One aligned line per layer (what ``print`` shows)."""
        tracked = any(info.osc_share is not None for info in self)
        head = ["layer", "kind", "W", "A", "grid", "per", "step min", "step max", "at clip"]
        head += ["oscillating"] if tracked else []
        lines = [head]
        for i in self:
            n, p = i.weight_grid
            cells = [
                i.name or "<root>",
                i.kind,
                str(i.weight_bits),
                "-" if i.act_bits is None else str(i.act_bits),
                f"[{n},{p}]",
                i.granularity,
                f"{i.step_min:.3g}",
                f"{i.step_max:.3g}",
                f"{100 * i.clip_share:.1f}%",
            ]
            if tracked:
                cells.append("-" if i.osc_share is None else f"{100 * i.osc_share:.2f}%")
            lines.append(cells)
        widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                for row in lines]
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()


@torch.no_grad()
def inspect(qmodel: nn.Module, tracker: Any = None, tensors: bool = False) -> Inspection:
    """One :class:`LayerInfo` per quantized layer, in registration order; prints as a table.

    ``tracker``: an :class:`~qatlab.methods.oscillation.OscillationTracker` (anything with
    ``layer_names``, ``frequency(name)`` and ``threshold``) adds each tracked layer's
    oscillating share. ``tensors=True`` keeps the step and integer-weight tensors.
    """
    tracked = set(getattr(tracker, "layer_names", ()))
    infos = Inspection()
    for name, layer in quant_layers(qmodel):
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        step = wq.current_step(layer.weight).detach()
        ints = layer.weight_int()
        n, p = wq.grid_range
        osc = None
        if name in tracked:
            osc = float((tracker.frequency(name) > tracker.threshold).float().mean())
        static_act = aq is not None and aq.policy not in DYNAMIC_POLICIES
        infos.append(
            LayerInfo(
                name=name,
                kind=type(layer).__name__,
                weight_bits=wq.bits,
                weight_grid=(n, p),
                granularity="channel" if wq.per_channel else "tensor",
                step_min=float(step.min()),
                step_max=float(step.max()),
                clip_share=float(((ints == n) | (ints == p)).float().mean()),
                act_bits=None if aq is None else aq.bits,
                act_grid=None if aq is None else aq.grid_range,
                act_step=float(aq.step.detach().float().mean()) if static_act else None,
                num_weights=layer.weight.numel(),
                osc_share=osc,
                weight_step=step.clone() if tensors else None,
                weight_int=ints.to(dtype=_int_dtype((n, p))) if tensors else None,
            )
        )
    return infos


def _int_dtype(grid: tuple[int, int]) -> torch.dtype:
    return torch.int8 if grid[0] >= -128 and grid[1] <= 127 else torch.uint8
