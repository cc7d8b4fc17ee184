"""SmoothQuant and AWQ: per-input-channel scales ``s`` with ``y = (x / s) (W s)^T``, and AWQ's clipping.

* SmoothQuant (Xiao et al., 2023): ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` moves
  activation outliers into the weight, so that activations quantize well (W8A8).
* AWQ (Lin et al., 2024): ``s = mean|x|^a``, normalised, with ``a`` searched on a grid to minimise
  an output error after weight quantization (the caller's loss: in ``quantize_`` the output of the
  smallest module holding every layer that shares the input), so that salient input channels keep
  precision. Then each weight group's clipping range is shrunk where that lowers the group's
  contribution to the layer output (``clip_search``).

All are pure functions of tensors (and of a loss callback); :class:`InputStats` collects the
statistics from a layer's inputs (channel abs-max, channel abs-mean, a bounded random sample of rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.quant import primitives as P
from slimtorch.quant.modules import quantize_weight
from slimtorch.spec import PerChannel, PerGroup, QuantSpec


class InputStats:
    """Per-channel ``max|x|`` and ``mean|x|`` of a Linear's inputs, and up to ``max_rows`` input rows."""

    def __init__(self, layer: nn.Module, max_rows: int = 4096, seed: int = 0) -> None:
        self.linear = isinstance(layer, nn.Linear)  # other layers (convs) are not smoothed: no statistics
        width = layer.weight.shape[1]
        self.absmax = torch.zeros(width)
        self.abssum = torch.zeros(width, dtype=torch.float64)
        self.n = 0
        self.rows: torch.Tensor | None = None
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        if not self.linear:
            return
        r = x.detach().float().reshape(-1, x.shape[-1])
        self.absmax = torch.maximum(self.absmax, r.abs().amax(0))
        self.abssum += r.abs().sum(0).double()
        self.n += r.shape[0]
        merged = r if self.rows is None else torch.cat([self.rows, r])
        if merged.shape[0] > self.max_rows:
            merged = merged[torch.randperm(merged.shape[0], generator=self.gen)[: self.max_rows]]
        self.rows = merged

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.n, 1)).float()


def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)``; channels that never fire keep ``s = 1``.

    ``weight``: (out, in); for layers sharing an input, their weights concatenated along ``out``.
    """
    w_absmax = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def fake_scaled_weight(weight: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W s) / s``: the weight the layer effectively applies to ``x`` after scaling by ``s``."""
    codes, scale, zero = quantize_weight(weight * s, spec)
    return (P.dequantize(codes, scale, zero, spec) / s).to(weight.dtype)


def awq_search(act_absmean: torch.Tensor, loss: Callable[[torch.Tensor], float],
               grid: int = 20) -> tuple[torch.Tensor, list[float]]:
    """AWQ's scale search: ``s = mean|x|^a / sqrt(max * min)`` for ``a = k / grid``, k = 0..grid-1.

    ``loss(s)`` is the output error with the weights quantized as ``Q(W s) / s``. ``a = 0`` is plain
    RTN, so the result is never worse than RTN on the loss. Returns (best s, loss per grid point).
    """
    base = act_absmean.float()
    best, best_loss, losses = torch.ones_like(base), float("inf"), []
    for k in range(grid):
        s = (base ** (k / grid)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        value = float(loss(s))
        losses.append(value)
        if value < best_loss:
            best, best_loss = s, value
    return best, losses


def awq_scales(weight: torch.Tensor, rows: torch.Tensor, act_absmean: torch.Tensor, spec: QuantSpec,
               grid: int = 20) -> tuple[torch.Tensor, list[float]]:
    """AWQ for one layer, with its own output on sample rows (n, in) as the loss (relative error)."""
    W = weight.detach().float()
    ref = rows @ W.T

    def loss(s: torch.Tensor) -> float:
        return ((rows @ fake_scaled_weight(W, s, spec).T - ref).norm() / ref.norm().clamp(min=1e-12)).item()

    return awq_search(act_absmean, loss, grid)


def clip_search(weight: torch.Tensor, rows: torch.Tensor, spec: QuantSpec, grid: int = 20,
                max_shrink: float = 0.5, max_rows: int = 512,
                out_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor] | None:
    """AWQ's clipping search: per weight group, the range ``[max(min, -c), min(max, c)]`` with
    ``c = amax|W_group| * (1 - i / grid)``, ``i < max_shrink * grid``, that minimises
    ``mean_n (x_group . (Q(w_group) - w_group))^2`` on input rows. Returns (scale, zero) for
    ``quantize_weight``, or None for granularities it does not apply to (per tensor).

    weight (out, in); rows (n, in), the layer's (already scaled) inputs.
    """
    gran = spec.granularity
    if not isinstance(gran, PerGroup | PerChannel) or (isinstance(gran, PerChannel) and gran.axis % 2 != 0):
        return None
    W = weight.detach().float()
    g = gran.size if isinstance(gran, PerGroup) else W.shape[1]
    x = rows.float()[:max_rows].reshape(-1, W.shape[1] // g, g)  # (n, G, g)
    lo_all, hi_all = P.min_max(W, spec)  # (out, G, 1) or (out, 1)
    shape = lo_all.shape[1:]
    lo_all, hi_all = lo_all.reshape(W.shape[0], -1, 1), hi_all.reshape(W.shape[0], -1, 1)
    best_lo, best_hi = lo_all.clone(), hi_all.clone()
    for o in range(0, W.shape[0], out_batch):
        w2 = W[o:o + out_batch]
        w = w2.reshape(-1, W.shape[1] // g, g)  # (ob, G, g)
        lo, hi = lo_all[o:o + out_batch], hi_all[o:o + out_batch]
        amax = torch.maximum(-lo, hi)
        best_err = torch.full(lo.shape, float("inf"))
        for i in range(max(1, int(max_shrink * grid))):
            c = amax * (1 - i / grid)
            clo, chi = torch.maximum(lo, -c), torch.minimum(hi, c)
            scale, zero = P.qparams(clo, chi, spec)
            scale, zero = scale.reshape(w2.shape[0], *shape), zero.reshape(w2.shape[0], *shape)
            wq = P.dequantize(P.quantize(w2, scale, zero, spec), scale, zero, spec).reshape(w.shape)
            err = torch.einsum("ngk,ogk->nog", x, wq - w).pow(2).mean(0).unsqueeze(-1)  # (ob, G, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo[o:o + out_batch] = torch.where(better, clo, best_lo[o:o + out_batch])
            best_hi[o:o + out_batch] = torch.where(better, chi, best_hi[o:o + out_batch])
    return P.qparams(best_lo.reshape(W.shape[0], *shape), best_hi.reshape(W.shape[0], *shape), spec)
