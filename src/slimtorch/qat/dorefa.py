"""DoReFa weight quantization (Zhou et al., 2016) with SAT's rescaling (Jin et al., "Towards efficient
training for neural network quantization", arXiv 1912.10207).

``w~ = tanh(w) / max|tanh(w)|``, ``u = (w~ + 1) / 2`` in [0, 1], ``w_q = 2 Q_b(u) - 1`` with one of the
schemes of the AdaBits/SAT code (straight-through gradient through the rounding):

* ``original``: ``Q(u) = round(n u) / n``, ``n = 2^b - 1`` (levels include -1 and 1);
* ``modified``: ``Q(u) = min(floor(2^b u), 2^b - 1) / 2^b`` (the code's default for weights: a
  lower bit-width is the higher one with its low bits dropped);
* ``centered``: ``modified + 0.5 / 2^b`` (levels symmetric about 0).

SAT's rule (``rescale=True``): ``w* = w_q / (sqrt(n_out) * std(w_q))``, ``n_out`` the output
channels times the kernel area, std not differentiated, so that the layer's output variance does not
depend on the bit-width; SAT applies it to the last linear layer (layers followed by batch norm are
unaffected by a constant factor).

Our extension for networks without batch norm (``match_std=True``; ``prepare_qat`` turns it on when the
model has no BatchNorm): ``w* = w_q * std(w) / std(w_q)`` (factor not differentiated), so the layer keeps
the float weight's spread. DoReFa's levels live in [-1, 1] whatever the weights' scale; a batch-normalised
layer does not care, but in a LayerNorm transformer the residual stream would be swamped.

The codes are integers ``k`` with ``w* = c * (k - z)`` for one scale ``c`` per tensor, so the trained
layer exports exactly to the core's format (``uint<b>`` with a half-integer zero-point for
``original`` and ``centered``; ``int<b>`` for ``modified``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.qat.ste import floor_ste, round_ste
from slimtorch.spec import PerTensor, QuantSpec

SCHEMES = ("original", "modified", "centered")


def dorefa_levels(u: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """Integer level ``k`` of ``u`` in [0, 1] (straight-through), and the map ``Q(u) = (k + offset) / d``."""
    if scheme == "original":
        return round_ste(u * (2**bits - 1))
    if scheme in ("modified", "centered"):
        return torch.clamp(floor_ste(u * 2**bits), max=2**bits - 1)
    raise SlimError(f"unknown DoReFa scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def _affine(bits: int, scheme: str) -> tuple[float, float]:
    """(d, zero) with ``2 Q(u) - 1 = (2 / d) * (k - zero)``."""
    if scheme == "original":
        return 2**bits - 1, (2**bits - 1) / 2
    return 2**bits, 2 ** (bits - 1) - (0.5 if scheme == "centered" else 0.0)


def _weight_levels(w: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """The integer levels ``k`` of ``u = (tanh(w) / max|tanh(w)| + 1) / 2`` (straight-through)."""
    t = torch.tanh(w)
    return dorefa_levels((t / t.abs().max().clamp(min=1e-12) + 1) / 2, bits, scheme)


def dorefa_weight(w: torch.Tensor, bits: int, scheme: str = "modified") -> torch.Tensor:
    """``w_q`` in [-1, 1] (before any rescaling)."""
    d, zero = _affine(bits, scheme)
    return (_weight_levels(w, bits, scheme) - zero) * (2 / d)


def sat_rescale(wq: torch.Tensor) -> torch.Tensor:
    """SAT's constant ``1 / (sqrt(n_out) * std(w_q))`` (not differentiated), n_out = shape[0] * kernel area."""
    n_out = wq.shape[0] * (wq[0, 0].numel() if wq.ndim > 2 else 1)
    return 1.0 / (math.sqrt(n_out) * wq.detach().float().std().clamp(min=1e-12))


class DoReFaWeight(nn.Module):
    """Weight quantizer: DoReFa levels, optionally SAT-rescaled. No learned parameters."""

    def __init__(self, bits: int, scheme: str = "modified", rescale: bool = False, match_std: bool = False) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise SlimError(f"unknown DoReFa scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.bits, self.scheme, self.rescale, self.match_std = bits, scheme, rescale, match_std

    def _factor(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor | float:
        if self.match_std:  # takes precedence over SAT's rule
            return w.detach().float().std() / wq.detach().float().std().clamp(min=1e-12)
        return sat_rescale(wq) if self.rescale else 1.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wq = dorefa_weight(w, self.bits, self.scheme)
        f = self._factor(w, wq)
        return wq * f.to(wq.dtype) if torch.is_tensor(f) else wq

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor) -> tuple[QuantSpec, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spec, codes (out, -1), scale, zero) with ``(codes - zero) * scale == forward(w)``."""
        k = _weight_levels(w.float(), self.bits, self.scheme)
        d, zero = _affine(self.bits, self.scheme)
        c = 2 / d * float(self._factor(w, (k - zero) * (2 / d)))
        if self.scheme == "modified":  # integer zero-point: signed codes, symmetric
            spec, codes, z = QuantSpec(f"int{self.bits}", PerTensor()), (k - zero).to(torch.int8), 0.0
        else:
            spec, codes, z = QuantSpec(f"uint{self.bits}", PerTensor(), symmetric=False), k.to(torch.int8), zero
        if self.bits == 8 and spec.dtype == "uint8":
            codes = k.to(torch.uint8)
        return spec, codes.reshape(w.shape[0], -1), torch.tensor(c), torch.tensor(z)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, rescale={self.rescale}, match_std={self.match_std}"
