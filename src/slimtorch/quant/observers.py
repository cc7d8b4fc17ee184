"""Observers: estimate the range ``[min, max]`` a static quantizer should cover, from data.

An observer sees tensors through ``update(x)`` (one call per calibration batch, or one call with a
weight) and answers ``range()`` in the scale shape of its spec's granularity (see primitives.py);
``qparams()`` turns that into scale and zero-point. Statistics stay here; quantize ops stay in
primitives.py.

* minmax: the running min and max.
* ema: the moving average of per-batch min and max (``c = 0.01``; the first batch initialises).
* percentile: the ``p``-th percentile (default 99.99) of the values (of ``|x|`` when symmetric).
* mse: the clipping of the min/max range that minimises the squared quantization error
  (grid search over 80 ratios from 1.0 down to 0.21, per granule).
* kl: TensorRT's entropy calibration: the symmetric threshold minimising KL(P || Q) between the
  2048-bin histogram of ``|x|`` and its quantized version (per-tensor only).

Percentile, mse and kl keep a bounded uniform sample (at most ``max_samples`` values) of the data
for per-tensor specs; for other granularities they keep the last tensor seen (a weight).
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.spec import PerTensor, QuantSpec


class Observer:
    """Running min/max (the ``minmax`` observer); the others override ``_update``/``range``."""

    def __init__(self, spec: QuantSpec, max_samples: int = 1 << 20, seed: int = 0) -> None:
        self.spec = spec
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        mn, mx = P.min_max(x, self.spec)
        # NaN propagates through min/max and Inf becomes one of them: checking the extremes checks x
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise SlimError("calibration data produced NaN or Inf activations; check the calibration set")
        self._update(x, mn, mx)
        self.batches += 1

    def _update(self, x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise SlimError("observer saw no data: the layer never ran during calibration")
        return self.min, self.max

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return P.qparams(*self.range(), self.spec)


class EMAObserver(Observer):
    def __init__(self, spec: QuantSpec, momentum: float = 0.01, **kw) -> None:
        super().__init__(spec, **kw)
        self.c = momentum

    def _update(self, x, mn, mx) -> None:
        if self.min is None:
            self.min, self.max = mn, mx
        else:
            self.min = self.min + self.c * (mn - self.min)
            self.max = self.max + self.c * (mx - self.max)


class _SampleObserver(Observer):
    """Keeps data for the search-based observers (bounded sample for per-tensor specs)."""

    def __init__(self, spec: QuantSpec, **kw) -> None:
        super().__init__(spec, **kw)
        self.data: torch.Tensor | None = None

    def _update(self, x, mn, mx) -> None:
        super()._update(x, mn, mx)
        if not isinstance(self.spec.granularity, PerTensor):
            self.data = x  # a weight: one update, kept whole
            return
        flat = x.flatten()
        merged = flat if self.data is None else torch.cat([self.data, flat])
        if merged.numel() > self.max_samples:
            idx = torch.randperm(merged.numel(), generator=self.gen)[: self.max_samples]
            merged = merged[idx]
        self.data = merged


class PercentileObserver(_SampleObserver):
    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kw) -> None:
        super().__init__(spec, **kw)
        if not 50.0 < percentile <= 100.0:
            raise SlimError(f"percentile must be in (50, 100], got {percentile}")
        self.p = percentile / 100.0

    def range(self):
        mn, mx = super().range()
        xg = P.grouped(self.data, self.spec)
        dims = P.reduce_dims(self.data, self.spec)
        rows = xg.movedim(dims, tuple(range(-len(dims), 0))).flatten(-len(dims))  # (..., n)
        if self.spec.symmetric:
            amax = torch.quantile(rows.abs(), self.p, dim=-1).reshape(mx.shape)
            return -amax, amax
        return (torch.quantile(rows, 1 - self.p, dim=-1).reshape(mn.shape),
                torch.quantile(rows, self.p, dim=-1).reshape(mx.shape))


class MSEObserver(_SampleObserver):
    def range(self):
        mn, mx = super().range()
        x = self.data
        dims = P.reduce_dims(x, self.spec)
        best_err, best_mn, best_mx = None, mn, mx
        for i in range(80):
            r = 1.0 - i / 100.0
            scale, zero = P.qparams(mn * r, mx * r, self.spec)
            err = (P.grouped(P.fake_quant(x, scale, zero, self.spec) - x, self.spec) ** 2)
            err = err.sum() if isinstance(self.spec.granularity, PerTensor) else err.sum(dim=dims, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mn, best_mx = torch.where(better, mn * r, best_mn), torch.where(better, mx * r, best_mx)
        return best_mn, best_mx


class KLObserver(_SampleObserver):
    bins = 2048

    def __init__(self, spec: QuantSpec, **kw) -> None:
        if not isinstance(spec.granularity, PerTensor):
            raise SlimError("the kl observer is per-tensor only; use minmax, percentile or mse per channel")
        super().__init__(spec, **kw)

    def range(self):
        mn, mx = super().range()
        threshold = kl_threshold(self.data.abs(), self.bins, levels=self._levels())
        return torch.maximum(mn, -threshold), torch.minimum(mx, threshold)

    def _levels(self) -> int:
        if self.spec.is_float:
            return 128  # an 8-bit budget for the positive half
        qmin, qmax = self.spec.qrange
        return qmax + 1 if self.spec.symmetric else (qmax - qmin + 1) // 2


def kl_threshold(absx: torch.Tensor, bins: int, levels: int, stride: int = 8) -> torch.Tensor:
    """TensorRT entropy calibration on ``|x|``: the clipping threshold whose ``levels``-level
    quantization of the histogram loses the least information (min KL divergence)."""
    amax = absx.max()
    if amax == 0:
        return amax
    hist = torch.histc(absx.double(), bins=bins, min=0.0, max=float(amax))
    width = float(amax) / bins
    best_kl, best_i = float("inf"), bins
    for i in range(levels, bins + 1, stride):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()  # outliers are clipped into the last bin
        nonzero = hist[:i] > 0
        # merge i bins into `levels` quantization bins, spread each back over its non-empty bins
        edges = torch.linspace(0, i, levels + 1).floor().long()
        q = torch.zeros(i, dtype=torch.float64)
        for j in range(levels):
            a, b = int(edges[j]), int(edges[j + 1])
            if b <= a:
                continue
            nz = nonzero[a:b]
            count = int(nz.sum())
            if count:
                q[a:b][nz] = hist[a:b].sum() / count
        p, q = p / p.sum(), q / q.sum().clamp(min=1e-12)
        mask = p > 0
        kl = float((p[mask] * (p[mask] / q[mask].clamp(min=1e-12)).log()).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return torch.tensor((best_i + 0.5) * width, dtype=torch.float32)


OBSERVER_TYPES: dict[str, type[Observer]] = {
    "minmax": Observer, "ema": EMAObserver, "percentile": PercentileObserver,
    "mse": MSEObserver, "kl": KLObserver,
}


def make_observer(spec: QuantSpec) -> Observer:
    """The observer named by ``spec.observer``."""
    return OBSERVER_TYPES[spec.observer](spec)
