"""A small Vision Transformer for 1-D or 2-D inputs (every projection a plain nn.Linear)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.models.registry import conv_dims, layers, register


class Attention(nn.Module):
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
    def __init__(self, input_shape, num_classes, patch, dim, depth, heads, mlp_ratio) -> None:
        super().__init__()
        dims = conv_dims("vit_tiny", input_shape)
        if any(s % patch for s in input_shape[1:]):
            raise ConfigError(
                f"vit_tiny: patch size {patch} must divide the input size {tuple(input_shape[1:])}"
            )
        if dim % heads:
            raise ConfigError(f"vit_tiny: dim {dim} must be divisible by heads {heads}")
        conv, _, _ = layers(dims)
        self.patch_embed = conv(input_shape[0], dim, patch, patch)
        tokens = math.prod(s // patch for s in input_shape[1:])
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))  # mean pooling over tokens


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
    """``patch=0`` picks one: 4 for 32-px images, 2 for 8-px, 4 for 40-long signals."""
    if not patch:
        size = input_shape[-1]
        patch = 4 if size % 4 == 0 and size >= 16 else 2 if size % 2 == 0 else 1
    return ViT(input_shape, num_classes, patch, dim, depth, heads, mlp_ratio)
