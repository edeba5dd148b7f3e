"""A small Vision Transformer for 1-D or 2-D inputs (every projection a plain nn.Linear)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.models.registry import conv_dims, layers, positive, register


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/output ``nn.Linear`` projections (so a
    quantizer sees each one), computed with ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Conv patch embedding (kernel = stride = patch), learned position embedding, pre-norm
    blocks, final LayerNorm, mean pooling over tokens, linear ``head``."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
    ) -> None:
        super().__init__()
        conv, _, _ = layers(len(input_shape) - 1)
        self.patch_embed = conv(input_shape[0], dim, patch, patch)
        tokens = math.prod(s // patch for s in input_shape[1:])
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def _auto_patch(spatial: tuple[int, ...]) -> int:
    """The patch size ``patch=0`` picks: the largest of 4, 2, 1 dividing every spatial size,
    using 4 only for sizes >= 16 (so 32x32 -> 4, 8x8 -> 2, length 40 -> 4)."""
    for p in (4, 2):
        if all(s % p == 0 for s in spatial) and (p < 4 or min(spatial) >= 16):
            return p
    return 1


@register("vit_tiny")
def vit_tiny(
    num_classes: int,
    input_shape: tuple[int, ...],
    patch: int = 0,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 2,
) -> nn.Module:
    """A tiny ViT; ``patch=0`` picks one (4 for 32-px images or 40-long signals, 2 for 8-px)."""
    conv_dims("vit_tiny", input_shape)
    for option, value in (
        ("dim", dim),
        ("depth", depth),
        ("heads", heads),
        ("mlp_ratio", mlp_ratio),
    ):
        positive("vit_tiny", option, value)
    spatial = tuple(input_shape[1:])
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
        raise ConfigError(
            f"model vit_tiny: patch must be a positive integer (or 0 = auto), got {patch!r}"
        )
    patch = patch or _auto_patch(spatial)
    if any(s % patch for s in spatial):
        raise ConfigError(
            f"model vit_tiny: patch size {patch} must divide the input size {spatial}; "
            "pass another patch (or 0 to choose automatically)"
        )
    if dim % heads:
        raise ConfigError(f"model vit_tiny: dim {dim} must be divisible by heads {heads}")
    return ViT(tuple(input_shape), num_classes, patch, dim, depth, heads, mlp_ratio)
