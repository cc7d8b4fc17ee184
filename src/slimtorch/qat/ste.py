"""Straight-through helpers shared by the training-time quantizers.

* :func:`round_ste`: ``round(x)`` forward, identity backward.
* :func:`scale_grad`: ``x`` forward, gradient multiplied by ``g`` backward (LSQ's gradient scale).
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with the straight-through gradient 1."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)`` with the straight-through gradient 1."""
    return x + (torch.floor(x) - x).detach()


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient is multiplied by ``g``."""
    return (x - x * g).detach() + x * g
