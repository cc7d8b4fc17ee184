"""Training-time augmentation for Fashion-MNIST batches (used by the zoo's training and by QAT)."""

from __future__ import annotations

import torch


def shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift of up to 2 px (padding with the background value) and horizontal flip.
    x: (B, 28, 28) or (B, 1, 28, 28) -> (B, 1, 28, 28)."""
    x = x.reshape(x.shape[0], 28, 28)
    b = x.shape[0]
    dx = torch.randint(0, 5, (b,), device=x.device, generator=gen)
    dy = torch.randint(0, 5, (b,), device=x.device, generator=gen)
    # out[i, r, c] = x[i, r + dy - 2, c + dx - 2], the batch minimum outside the image: the same as
    # indexing a copy padded by 2 px, without reading the minimum back to Python (a GPU wait per step)
    rows = dy[:, None] + torch.arange(28, device=x.device)[None] - 2  # (B, 28)
    cols = dx[:, None] + torch.arange(28, device=x.device)[None] - 2
    inside = ((rows >= 0) & (rows < 28))[:, :, None] & ((cols >= 0) & (cols < 28))[:, None, :]
    i = torch.arange(b, device=x.device)[:, None, None]
    out = x[i, rows.clamp(0, 27)[:, :, None], cols.clamp(0, 27)[:, None, :]]
    out = torch.where(inside, out, x.min())
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out.unsqueeze(1)
