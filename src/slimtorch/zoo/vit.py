"""fmnist-vit: a tiny Vision Transformer for Fashion-MNIST.

Attention is written out (q @ k^T, softmax, @ v) rather than fused, so that later
quantizers can reach the matmul inputs and the softmax output.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.quant.modules import MatmulInput


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # matmul inputs without weights: identities unless a recipe quantizes attention
        self.q_in, self.k_in, self.v_in = MatmulInput("q"), MatmulInput("k"), MatmulInput("v")
        self.probs = MatmulInput("probs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B, H, T, D)
        q, k, v = self.q_in(q), self.k_in(k), self.v_in(v)
        att = self.probs(torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1))  # (B, H, T, T)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, -1))  # -1: heads may be pruned


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FmnistViT(nn.Module):
    """Patch 4 (7x7 = 49 patches) + class token, learned positions, ``depth`` blocks."""

    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: int = 2,
                 patch: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        n = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 49, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))
