"""CacheQuant's decoupled error correction: a per-channel affine map fitted offline by least squares.

For each output channel c, ``real ≈ a_c * approx + b_c`` with ``a_c = Cov(approx, real) / Var(approx)`` and
``b_c = mean(real) - a_c mean(approx)`` over every sample and position of that channel: the closed form of
the least-squares line. Applied to a cached feature (per step) and to the output of the first layer that
consumes it under quantization; at inference it is one multiply-add per element.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def fit_affine(approx: torch.Tensor, real: torch.Tensor, channel_dim: int = 1,
               eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (C,), b (C,)) float32 per channel (``channel_dim`` of tensors shaped alike, e.g. (N, C, H, W)); a
    channel that does not vary in ``approx`` gets a = 1 and b = the mean difference."""
    if approx.shape != real.shape:
        raise SlimError(f"error correction: shapes differ, {tuple(approx.shape)} and {tuple(real.shape)}")
    c = approx.shape[channel_dim]
    x = approx.double().movedim(channel_dim, 0).reshape(c, -1)
    y = real.double().movedim(channel_dim, 0).reshape(c, -1)
    mx, my = x.mean(1), y.mean(1)
    var = (x - mx[:, None]).pow(2).mean(1)
    cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
    flat = var <= eps
    a = torch.where(flat, torch.ones_like(var), cov / var.clamp(min=eps))
    b = my - a * mx
    return a.float(), b.float()


def apply_affine(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """``a_c t + b_c`` per channel."""
    shape = [1] * t.dim()
    shape[channel_dim] = -1
    return t * a.to(t.dtype).view(shape) + b.to(t.dtype).view(shape)


def fit_cache_correction(features: torch.Tensor, refresh: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per-step corrections of a cached feature, from the features (S, B, C, ...) that a full run computes at
    every step: at a step i that reuses the feature of its last refresh j, fit ``F_i ≈ a F_j + b`` per channel
    (least squares over samples and positions). Refresh steps get no entry (their feature is fresh)."""
    if features.dim() < 3:
        raise SlimError(f"cache correction needs features (steps, batch, channels, ...); got {tuple(features.shape)}")
    fresh = set(refresh)
    if 0 not in fresh:
        raise SlimError("a cache schedule refreshes at step 0")
    tables, last = {}, 0
    for i in range(features.shape[0]):
        if i in fresh:
            last = i
            continue
        tables[i] = fit_affine(features[last], features[i], channel_dim=1)
    return tables
