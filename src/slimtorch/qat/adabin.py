"""AdaBin: adaptive binary sets for 1-bit weights and activations (Tu et al., ECCV 2022; official code in
huawei-noah/Efficient-Computing, BinaryNetworks/AdaBin).

* Weights, per output channel, no learned parameters: ``beta_w = mean(w)``, ``alpha_w = std(w)`` (over
  in x kh x kw, population form), ``w_b = alpha_w * sign((w - beta_w) / alpha_w) + beta_w``, so each
  channel's two values are ``beta_w -/+ alpha_w``. Backward of sign: IR-Net's EDE,
  ``k t (1 - tanh^2(t x))`` with ``t`` going from 1e-3 to 10 log-linearly over training and
  ``k = max(1/t, 1)``.
* Activations, per layer, learned ``alpha_a`` (init 1) and ``beta_a`` (init 0):
  ``x' = (x - beta_a) / alpha_a``, output ``alpha_a * (sign(x') + beta_a)`` as in the code; backward of
  sign: Bi-Real's piecewise polynomial (``2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 outside).
* Non-linearity: per-channel Maxout ``p relu(x) - n relu(-x)``, p init 1, n init 0.25.

Still to come (issue 6): the AdaBin layers in a model, its training recipe, and the sign baseline.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _EDESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, t: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.t = t
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        t = ctx.t
        k = max(1.0 / t, 1.0)
        return grad * k * t * (1 - torch.tanh(t * x) ** 2), None


class _BiRealSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        g = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x) * (x.abs() < 1)
        return grad * g


def ede_t(epoch: int, epochs: int, t_min: float = 1e-3, t_max: float = 10.0) -> float:
    """IR-Net's schedule: ``t`` from ``t_min`` to ``t_max`` log-linearly over the epochs."""
    frac = epoch / max(epochs, 1)
    return 10 ** (math.log10(t_min) + (math.log10(t_max) - math.log10(t_min)) * frac)


def adabin_weight(w: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """``alpha * sign((w - beta) / alpha) + beta`` per output channel (w: (out, ...))."""
    dims = tuple(range(1, w.ndim))
    beta = w.mean(dim=dims, keepdim=True)
    alpha = (w - beta).pow(2).mean(dim=dims, keepdim=True).sqrt().clamp(min=1e-8)
    return alpha * _EDESign.apply((w - beta) / alpha, t) + beta


def adabin_act(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``alpha * (sign((x - beta) / alpha) + beta)`` with Bi-Real's sign gradient."""
    return alpha * (_BiRealSign.apply((x - beta) / alpha) + beta)


class AdaBinAct(nn.Module):
    """The activation binarizer with its learned scalars ``alpha`` (init 1) and ``beta`` (init 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adabin_act(x, self.alpha, self.beta)


class Maxout(nn.Module):
    """``p relu(x) - n relu(-x)`` per channel (dim 1), p init 1, n init 0.25."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.n = nn.Parameter(torch.full((1, channels, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self.p * torch.relu(x) - self.n * torch.relu(-x)
