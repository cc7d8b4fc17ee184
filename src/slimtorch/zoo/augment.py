"""Training-time augmentation for Fashion-MNIST batches (used by the zoo's training and by QAT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift of up to 2 px (padding with the background value) and horizontal flip.
    x: (B, 28, 28) or (B, 1, 28, 28) -> (B, 1, 28, 28)."""
    x = x.reshape(x.shape[0], 28, 28)
    b = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx = torch.randint(0, 5, (b,), device=x.device, generator=gen)
    dy = torch.randint(0, 5, (b,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(28, device=x.device)[None])  # (B, 28)
    cols = (dx[:, None] + torch.arange(28, device=x.device)[None])
    out = pad[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out.unsqueeze(1)
