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

:func:`binarize_cnn` turns the zoo's residual CNN into a W1A1 network: every 3x3 convolution inside the
residual blocks becomes a :class:`BinaryConv2d` and every ReLU a Maxout; the stem, the 1x1 downsampling
shortcuts and the classifier stay in floating point (as the paper keeps first, last and downsampling
layers real-valued). ``method="sign"`` builds the baseline the paper improves on, under the same
architecture and training: XNOR-Net's weights ``mean|w| sign(w)`` per output channel (straight-through)
and plain ``sign(x)`` activations, with the same Bi-Real gradient as AdaBin's, so the two differ only in
their binary sets. :func:`set_ede` moves the EDE schedule (call it at the start of each epoch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtorch.errors import SlimError


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


def xnor_weight(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's ``mean|w| sign(w)`` per output channel, straight-through gradient."""
    dims = tuple(range(1, w.ndim))
    wb = w.abs().mean(dim=dims, keepdim=True).detach() * _sign(w)
    return w + (wb - w).detach()


class SignAct(nn.Module):
    """``sign(x)`` with Bi-Real's gradient (the baseline's activation binarizer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BiRealSign.apply(x)


class BinaryConv2d(nn.Conv2d):
    """A convolution on binarized inputs and weights: ``method`` ``adabin`` (adaptive sets, EDE) or
    ``sign`` (XNOR-style weights, sign activations). The weight stays real-valued for training."""

    def __init__(self, conv: nn.Conv2d, method: str) -> None:
        if method not in ("adabin", "sign"):
            raise SlimError(f"unknown binarization {method!r}; choose adabin or sign")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.method, self.t = method, 1.0
        self.act = AdaBinAct() if method == "adabin" else SignAct()
        self.act.to(conv.weight.device)

    def binary_weight(self) -> torch.Tensor:
        return adabin_weight(self.weight, self.t) if self.method == "adabin" else xnor_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self._conv_forward(self.act(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method}"


def binarize_cnn(model: nn.Module, method: str = "adabin") -> nn.Module:
    """W1A1 version of the zoo's residual CNN (in place; returns it): see the module docstring."""
    blocks = [m for m in model.modules() if hasattr(m, "conv1") and hasattr(m, "conv2") and hasattr(m, "shortcut")]
    if not blocks or not hasattr(model, "stem"):
        raise SlimError("binarize_cnn takes the zoo's residual CNN (fmnist-cnn): a stem and residual blocks")
    for b in blocks:
        b.conv1[0] = BinaryConv2d(b.conv1[0], method)
        b.conv1[2] = Maxout(b.conv1[0].out_channels).to(b.conv2.weight.device)
        b.conv2 = BinaryConv2d(b.conv2, method)
        b.relu = Maxout(b.conv2.out_channels).to(b.conv2.weight.device)
    model.stem[2] = Maxout(model.stem[0].out_channels).to(model.stem[0].weight.device)
    return model


def set_ede(model: nn.Module, epoch: int, epochs: int) -> None:
    """Set every AdaBin layer's EDE ``t`` for ``epoch`` of ``epochs``."""
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.t = ede_t(epoch, epochs)
