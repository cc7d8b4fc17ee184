"""F8Net's fixed-point 8-bit quantizer and its format rule (Jin et al., ICLR 2022; snap-research/F8Net).

A value is held as an 8-bit integer with ``fl`` fractional bits: ``x_q = clamp(round(x 2^fl), lo, hi) / 2^fl``,
``[lo, hi] = [-(2^7 - 1), 2^7 - 1]`` signed or ``[0, 2^8 - 1]`` unsigned; straight-through gradient inside
the range, 0 where clipped. Multiplying two such numbers and moving the result to another format is an
integer product and a bit shift: no floating-point multiply.

The format comes from the tensor's standard deviation (the official ``format_from_metric``, metric
``std``): ``fl = clamp(floor(log2(c / sigma)), 0, 8 - signed)`` with ``c = 40`` (signed) or ``70``
(unsigned).

Still to come (issue 6): BN folding during training, PACT in fixed point with the next layer's scale
absorbed, and the integer-only reference forward.
"""

from __future__ import annotations

import math

import torch

WORD = 8


def fix_range(signed: bool, wl: int = WORD) -> tuple[int, int]:
    return (-(2 ** (wl - 1) - 1), 2 ** (wl - 1) - 1) if signed else (0, 2**wl - 1)


def fix_quant(x: torch.Tensor, fl: int, signed: bool = True, wl: int = WORD) -> torch.Tensor:
    """``clamp(round(x 2^fl), lo, hi) / 2^fl`` with the straight-through gradient masked to the range."""
    lo, hi = fix_range(signed, wl)
    scaled = x * 2.0**fl
    inside = (scaled >= lo) & (scaled <= hi)
    q = torch.clamp(torch.round(scaled), lo, hi) / 2.0**fl
    return torch.where(inside, x + (q - x).detach(), q.detach())


def fraclen_from_std(sigma: float, signed: bool = True, wl: int = WORD) -> int:
    """F8Net's rule: ``clamp(floor(log2(c / sigma)), 0, wl - signed)``, c = 40 signed, 70 unsigned."""
    c = 40.0 if signed else 70.0
    if not sigma > 0:
        return wl - int(signed)
    return int(min(max(math.floor(math.log2(c / sigma)), 0), wl - int(signed)))
