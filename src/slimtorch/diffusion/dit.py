"""A small class-conditional DiT (Peebles & Xie) for 32x32 images: patch size 2 (256 tokens), learned
position embeddings, ``depth`` transformer blocks conditioned by adaLN-Zero on the sum of the time-step and
class embeddings (one extra class row, ``num_classes``, for "no class": classifier-free guidance), and a
final adaLN + linear back to patches.

The blocks are ``DiT.blocks`` (a ModuleList): block caching (FORA / Delta-DiT) and the adaptive criterion
(TeaCache, from the modulated input of block 0) hook them there. Linears carry the compute, so the fp8/int8
kernels of ``slimtorch.kernels`` run them on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.diffusion.unet import timestep_embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) * (1 + scale) + shift, scale and shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, R, R) -> (B, (R/p)^2, C p p): row-major patches, each flattened channel-major."""
    b, c, r, _ = x.shape
    g = r // p
    return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, C p p) -> (B, C, R, R)."""
    b, n, _ = x.shape
    g = round(n**0.5)
    return x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)


class DiTBlock(nn.Module):
    """LayerNorm (no affine) -> modulate -> attention -> gated residual; the same for the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)  # shift/scale/gate for attention and MLP, zero-initialised

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, D)
        b, n, d = x.shape
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)
        q, k, v = self.qkv(modulate(self.norm1(x), s1, sc1)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None] * self.proj(a)
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), s2, sc2)), approximate="tanh"))
        return x + g2[:, None] * h


class DiT(nn.Module):
    """x (B, C, R, R), t (B,), y (B,) in 0..num_classes -> (B, C, R, R)."""

    def __init__(self, in_ch: int = 1, resolution: int = 32, patch: int = 2, dim: int = 256, depth: int = 6,
                 heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.in_ch, self.patch, self.grid, self.dim, self.num_classes = in_ch, patch, resolution // patch, dim, num_classes
        self.embed_patches = nn.Linear(in_ch * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, in_ch * patch * patch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, small position embeddings, zero adaLN and output layers
        (every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.label.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
        for m in (self.ada_out, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B,), (B,) -> (B, D)
        return self.time(timestep_embedding(t, self.dim).to(self.pos.dtype)) + self.label(y)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, R, R) -> (B, N, D)
        return self.embed_patches(patchify(x, self.patch)) + self.pos

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, C, R, R)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        return unpatchify(self.out(modulate(self.norm_out(x), shift, scale)), self.patch, self.in_ch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.condition(t, y)
        h = self.tokens(x)
        for blk in self.blocks:
            h = blk(h, c)
        return self.head(h, c)
