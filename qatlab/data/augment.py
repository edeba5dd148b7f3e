"""Batch augmentations (vectorised: one call augments a whole batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class CropFlip:
    """Random crop back to the original size from a zero-padded image, then a random
    horizontal flip with probability 1/2; the standard CIFAR augmentation, for a batch
    ``(N, C, H, W)`` at once, on the batch's device. Randomness comes only from the (CPU)
    generator passed in: the draws are made on the CPU and moved, so a batch augments to the
    same numbers on any device."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding, self.flip = int(padding), flip

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        p = self.padding
        dev = x.device
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev, non_blocking=True)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev, non_blocking=True)
            rows = (dy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
            cols = (dx[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
            batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
            chan = torch.arange(c, device=dev).view(1, c, 1, 1)
            x = padded[batch, chan, rows, cols]
        if self.flip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(dev, non_blocking=True)
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        return x
