"""A small class-conditional DDPM UNet (Ho et al.'s layout) for 32x32 images.

conv_in, then per resolution level ``blocks`` residual blocks (self-attention at the resolutions in
``attn_res``) and a 2x downsample (not after the last level); a middle of res-attn-res; the up path mirrors
it with one more residual block per level, each taking the concatenation of the running tensor and one skip
(DDPM's skip connections); GroupNorm, SiLU, conv_out. The time step (sinusoidal) and the class (an
embedding with one extra row, ``num_classes``, for "no class": classifier-free guidance) are summed into
one embedding that every residual block adds after its first convolution.

For LowDiff's cascade (:mod:`slimtorch.diffusion.cascade`) one network serves two resolutions:
``cond_ch`` extra input channels take the low-resolution result upsampled (zeros at the low-resolution
stage) and ``resolutions`` > 1 adds a learned embedding of the stage to the time embedding.

The forward is split for DeepCache-style caching (:mod:`slimtorch.diffusion.cache`): :meth:`DDPMUNet.encode`
runs the down path up to skip ``k`` and :meth:`DDPMUNet.decode` runs the up path from the up block that
consumes skip ``k``; the tensor that enters that up block (before the concatenation) is the feature a
partial step reuses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cos then sin of t / max_period^(i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + embedding, GN-SiLU-dropout-conv, with a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W), (B, emb)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int, groups: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class Down(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Modules applied in turn with the embedding (a residual block, then attention and/or resampling)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = m(x, emb)
        return x


class DDPMUNet(nn.Module):
    """x (B, C, R, R), t (B,) steps, y (B,) class ids in 0..num_classes (num_classes: no class) -> (B, C, R, R);
    R = 32 (or 16 for a cascade's first stage: the network is convolutional)."""

    def __init__(self, in_ch: int = 1, ch: int = 64, mult: tuple[int, ...] = (1, 2, 2), blocks: int = 2,
                 attn_res: tuple[int, ...] = (8,), num_classes: int = 10, resolution: int = 32,
                 groups: int = 32, dropout: float = 0.1, cond_ch: int = 0, resolutions: int = 1) -> None:
        super().__init__()
        self.num_classes, emb = num_classes, 4 * ch
        self.ch, self.cond_ch = ch, cond_ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb)
        self.stage = nn.Embedding(resolutions, emb) if resolutions > 1 else None
        self.conv_in = nn.Conv2d(in_ch + cond_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()  # each stage produces one skip
        chans, c, res = [ch], ch, resolution
        for level, m in enumerate(mult):
            for _ in range(blocks):
                stage = Stage([ResBlock(c, ch * m, emb, groups, dropout)])
                c = ch * m
                if res in attn_res:
                    stage.append(Attention(c, groups))
                self.down.append(stage)
                chans.append(c)
            if level + 1 < len(mult):
                self.down.append(Stage([Down(c)]))
                chans.append(c)
                res //= 2
        self.mid = Stage([ResBlock(c, c, emb, groups, dropout), Attention(c, groups), ResBlock(c, c, emb, groups, dropout)])
        self.up = nn.ModuleList()  # up[j] consumes skip len(chans) - 1 - j
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                block = ResBlock(c + chans.pop(), ch * m, emb, groups, dropout)
                block.concat_split = c  # its input is cat([h, skip]): h's channels (shortcut-split quantization)
                stage = Stage([block])
                c = ch * m
                if res in attn_res:
                    stage.append(Attention(c, groups))
                if level > 0 and i == blocks:
                    stage.append(Up(c))
                    res *= 2
                self.up.append(stage)
        self.norm_out, self.conv_out = nn.GroupNorm(groups, c), nn.Conv2d(c, in_ch, 3, padding=1)

    @property
    def num_skips(self) -> int:
        return len(self.down) + 1

    def embed(self, t: torch.Tensor, y: torch.Tensor, stage: torch.Tensor | None = None) -> torch.Tensor:
        """(B,), (B,) [, (B,) stage ids] -> (B, emb)."""
        e = self.time(timestep_embedding(t, self.ch).to(self.label.weight.dtype)) + self.label(y)
        if self.stage is not None:
            e = e + self.stage(torch.zeros_like(y) if stage is None else stage)
        return e

    def encode(self, x: torch.Tensor, emb: torch.Tensor, upto: int | None = None,
               cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The skips 0..upto (all by default) of the down path; the last is the running tensor. ``cond``
        (B, cond_ch, H, W): the extra input channels (zeros when None)."""
        upto = self.num_skips - 1 if upto is None else upto
        if self.cond_ch:
            cond = x.new_zeros(x.shape[0], self.cond_ch, *x.shape[2:]) if cond is None else cond.to(x.dtype)
            x = torch.cat([x, cond], dim=1)
        hs = [self.conv_in(x)]
        for stage in self.down[:upto]:
            hs.append(stage(hs[-1], emb))
        return hs

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The up path from up block ``start`` (which consumes skip ``num_skips - 1 - start``) with the
        running tensor ``h``; ``skips`` holds skips 0 .. num_skips - 1 - start."""
        for stage in self.up[start:]:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None,
                stage: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y, stage)
        hs = self.encode(x, emb, cond=cond)
        return self.decode(self.mid(hs[-1], emb), hs, emb)
