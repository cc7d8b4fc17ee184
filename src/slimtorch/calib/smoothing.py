"""SmoothQuant and AWQ: per-input-channel scales ``s`` with ``y = (x / s) (W s)^T``.

* SmoothQuant (Xiao et al., 2023): ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` moves
  activation outliers into the weight, so that activations quantize well (W8A8).
* AWQ (Lin et al., 2024): ``s = mean|x|^a``, normalised, with ``a`` searched on a grid to minimise
  the layer's output error after weight quantization, so that salient input channels keep
  precision (weight-only W4/W3).

Both are pure functions of statistics; :class:`InputStats` collects the statistics from a layer's
inputs (channel abs-max, channel abs-mean, and a bounded random sample of input rows).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.quant import primitives as P
from slimtorch.quant.modules import quantize_weight
from slimtorch.spec import QuantSpec


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
    """``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)``; channels that never fire keep ``s = 1``."""
    w_absmax = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def awq_scales(weight: torch.Tensor, rows: torch.Tensor, act_absmean: torch.Tensor, spec: QuantSpec,
               grid: int = 20) -> tuple[torch.Tensor, list[float]]:
    """The AWQ scale search. weight (out, in), rows (n, in) sample inputs.

    Returns the best ``s`` (in,) and the relative output error for each grid point ``a = k / grid``.
    """
    W = weight.detach().float()
    ref = rows @ W.T
    base = act_absmean.float().clamp(min=1e-6)
    best, best_err, errors = torch.ones_like(base), float("inf"), []
    for k in range(grid):
        s = base ** (k / grid)
        s = s / (s.max() * s.min()).sqrt()
        codes, scale, zero = quantize_weight(W * s, spec)
        wq = P.dequantize(codes, scale, zero, spec) / s
        err = ((rows @ wq.T - ref).norm() / ref.norm().clamp(min=1e-12)).item()
        errors.append(err)
        if err < best_err:
            best, best_err = s, err
    return best, errors
