"""Calibration data for diffusion models drawn across the whole sampling trajectory.

A diffusion model is quantized once but runs at every step, on inputs whose distribution drifts from pure
noise to clean images; calibration must therefore see every part of the trajectory. Q-Diffusion draws the
same number of samples at every step (:func:`uniform_counts`). EDA-DM's TDAC (:func:`tdac_weights`) gives
more samples to steps whose features are typical of many others (density) and to steps that differ from the
rest (diversity), from features f_t (B, ...) hooked at every step of one FP run:

    d_t = #{s != t : MSE(f_t, f_s) <= r}      v_t = sum_{s != t} sum_b (1 - cos(f_t[b], f_s[b]))
    w_t = minmax(d)_t + lambda minmax(v)_t    (r = 3.0 on CIFAR, lambda = 1.2)

and step t gets round(N w_t / sum w) samples (:func:`allocate`: largest remainders, so the counts sum to N).
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def _minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return torch.zeros_like(v) if span <= 0 else (v - v.min()) / span


def tdac_weights(features: torch.Tensor, radius: float = 3.0, lam: float = 1.2) -> torch.Tensor:
    """Per-step weights (S,) float64 from features (S, B, ...) of one FP sampling run (module docstring)."""
    if features.dim() < 2 or features.shape[0] < 2:
        raise SlimError(f"TDAC needs features (steps >= 2, batch, ...); got {tuple(features.shape)}")
    s, b = features.shape[:2]
    f = features.reshape(s, b, -1).double()
    mse = torch.cdist(f.reshape(s, -1), f.reshape(s, -1)).pow(2) / f[0].numel()  # (S, S): mean squared error
    off = ~torch.eye(s, dtype=torch.bool)
    density = ((mse <= radius) & off).sum(1).double()
    unit = f / f.norm(dim=2, keepdim=True).clamp(min=1e-12)
    cos = torch.einsum("sbd,tbd->stb", unit, unit)  # (S, S, B): cosine of the same sample at two steps
    diversity = ((1 - cos).sum(2) * off).sum(1)
    return _minmax(density) + lam * _minmax(diversity)


def allocate(weights: torch.Tensor, n: int, cap: int | None = None) -> list[int]:
    """Integer counts proportional to ``weights`` (S,), summing to ``n`` (largest remainders); with ``cap``,
    no count exceeds it and what a capped step cannot take goes to the others in proportion."""
    if n < 0 or weights.numel() == 0 or bool((weights < 0).any()):
        raise SlimError("calibration allocation needs n >= 0 and non-negative weights")
    if cap is not None and cap * weights.numel() < n:
        raise SlimError(f"calibration allocation: {n} samples do not fit {weights.numel()} steps of at most {cap}")
    w = weights.double()
    counts = torch.zeros_like(w, dtype=torch.long)
    free = torch.ones_like(w, dtype=torch.bool)
    while True:
        left = n - int(counts.sum())
        ww = torch.where(free, w, torch.zeros_like(w))
        ww = torch.where(free, torch.ones_like(w), ww) if float(ww.sum()) <= 0 else ww
        exact = left * ww / ww.sum()
        add = exact.floor().long()
        rest = left - int(add.sum())
        if rest:
            order = torch.argsort(torch.where(free, exact - add, torch.full_like(exact, -1.0)), descending=True, stable=True)
            add[order[:rest]] += 1
        if cap is None or not bool((counts + add > cap).any()):
            return (counts + add).tolist()
        over = counts + add > cap  # fix the capped steps, share the rest again
        counts[over] = cap
        free &= ~over


def uniform_counts(steps: int, n: int) -> list[int]:
    """The same number of samples at every step (Q-Diffusion), the remainder to the earliest steps."""
    return allocate(torch.ones(steps), n)


def draw(trajectory: torch.Tensor, counts: list[int],
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration inputs from a stored trajectory (S, B, ...) (x_t at each step for B samples): for step i,
    ``counts[i]`` of its B samples, without replacement. Returns (x (N, ...), step index (N,), sample index
    (N,))."""
    s, b = trajectory.shape[:2]
    if len(counts) != s or max(counts, default=0) > b:
        raise SlimError(f"calibration draw: {len(counts)} counts for {s} steps, at most {b} samples a step")
    steps, rows = [], []
    for i, c in enumerate(counts):
        rows.append(torch.randperm(b, generator=generator)[:c])
        steps.append(torch.full((c,), i, dtype=torch.long))
    step, row = torch.cat(steps), torch.cat(rows)
    return trajectory[step, row], step, row
