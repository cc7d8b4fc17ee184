"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

``gptq_quantize`` is the pure function; ``Hessian`` accumulates ``H = 2/n * sum x x^T`` from captured
inputs (linear inputs as rows, conv inputs as unfolded patches).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.quant.modules import same_pads
from slimtorch.quant.observers import make_observer
from slimtorch.spec import PerChannel, PerGroup, PerTensor, QuantSpec


class Hessian:
    """Running ``H = 2/n * sum_i x_i x_i^T`` over the input rows a layer sees. H: (in, in) float64, on the
    device of the first input (a block streamed to the GPU accumulates there).

    Layers that read the same tensor (q/k/v after a norm, gate/up) get the same ``x_i``: with ``products``
    (a dict :func:`~slimtorch.sequential.collect` shares among the Hessians of one scope) the product
    ``X^T X`` of one input tensor is computed once and added to each of them (timings:
    benchmarks/notes/issue23_scale.md)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.width = layer.weight[0].numel()
        # grouped convolutions: each output sees only its group's inputs, so one Hessian does not
        # describe the layer; H stays None and the caller rounds to nearest instead
        self.grouped = isinstance(layer, nn.Conv2d) and layer.groups != 1
        self.H: torch.Tensor | None = None
        self.n = 0
        self.products: dict | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            if getattr(c, "tf_same_padding", False):  # the padding the layer applies itself
                x = F.pad(x, same_pads(tuple(x.shape[-2:]), c.kernel_size, c.stride))
            patches = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # (B, C*kh*kw, L)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return x.reshape(-1, x.shape[-1])

    def _product(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(X^T X in float64, rows of X), shared with the other layers of the scope that read ``x``."""
        c = self.products if isinstance(self.layer, nn.Linear) else None
        if c is not None and c.get("x") is x:
            return c["product"], c["rows"]
        r = self.rows(x.detach()).double()
        out = (r.T @ r, r.shape[0])
        if c is not None:
            c.update(x=x, product=out[0], rows=out[1])
        return out

    def add(self, x: torch.Tensor) -> None:
        if self.grouped:
            return
        if self.H is None:
            self.H = torch.zeros(self.width, self.width, dtype=torch.float64, device=x.device)
        product, m = self._product(x)
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += product * (2.0 / self.n)


def inverse_hessian_factor(H: torch.Tensor, damp: float, method: str) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (H is damped in place): the rows
    that GPTQ's and SparseGPT's column passes read their updates from."""
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise SlimError(f"{method}: the layer's Hessian is not positive definite even after damping; "
                        "raise the damping or use more calibration samples") from None


def column_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` per output channel: how a column pass quantizes one column with its (out, 1) parameters."""
    return replace(spec, granularity=PerChannel(0))


def fit_columns(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, 1) scale and zero-point for the columns ``w`` (out, k) under ``spec``'s observer: per output row,
    or one for all rows with a per-tensor spec (what a column pass quantizes a column, or a group, with)."""
    obs = make_observer(column_spec(spec) if not isinstance(spec.granularity, PerTensor) else spec)
    obs.update(w.float())
    s, z = obs.qparams()
    rows = w.shape[0]
    return s.expand(rows, 1) if s.ndim == 0 else s, z.expand(rows, 1) if z.ndim == 0 else z


def column_qparams(scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (out, in) parameters of a column pass, in the scale shapes of primitives.py for ``spec``."""
    gran = spec.granularity
    if isinstance(gran, PerGroup):
        return scales[:, ::gran.size].unsqueeze(-1).contiguous(), zeros[:, ::gran.size].unsqueeze(-1).contiguous()
    if isinstance(gran, PerTensor):
        return scales[0, 0], zeros[0, 0]
    return scales[:, :1].contiguous(), zeros[:, :1].contiguous()


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one weight.

    Args:
        weight: (out, in) float weight (conv weights flattened to (out, in*kh*kw)).
        H: (in, in) Hessian of the layer inputs.
        spec: weight QuantSpec (per-tensor, per-channel on axis 0, or per-group).
        block_size: columns per lazy batch update.
        damp: fraction of the mean diagonal added to H.
        act_order: quantize columns by decreasing Hessian diagonal (groups keep their original columns,
            with parameters from the un-updated weight: "static groups").

    Returns:
        (codes (out, in), scale, zero) in the scale shapes of primitives.py.
    """
    W = weight.detach().double().clone()
    out_f, in_f = W.shape
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gran = spec.granularity
    group = gran.size if isinstance(gran, PerGroup) else None
    if isinstance(gran, PerChannel) and gran.axis % 2 != 0:
        raise SlimError("GPTQ needs per-channel weight scales on axis 0 (output channels)")

    if group is None:
        col_scale, col_zero = fit_columns(W, spec)
    elif act_order:
        gs, gz = zip(*(fit_columns(W[:, g:g + group], spec) for g in range(0, in_f, group)))
        group_scale, group_zero = torch.cat(gs, 1), torch.cat(gz, 1)  # (out, G)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp, "GPTQ")

    colspec = column_spec(spec)
    Q = torch.zeros_like(W)
    scales = torch.zeros(out_f, in_f, dtype=torch.float32)
    zeros = torch.zeros(out_f, in_f, dtype=torch.float32)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if group is not None and not act_order and col % group == 0:
                col_scale, col_zero = fit_columns(W1[:, i:i + group] if i + group <= W1.shape[1]
                                                  else torch.cat([W1[:, i:], W[:, i2:i1 + i + group]], 1), spec)
            if group is not None and act_order:
                col_scale, col_zero = group_scale[:, col // group:col // group + 1], group_zero[:, col // group:col // group + 1]
            w = W1[:, i:i + 1]
            q = P.dequantize(P.quantize(w.float(), col_scale, col_zero, colspec), col_scale, col_zero, colspec).double()
            Q[:, i1 + i] = q[:, 0]
            scales[:, col], zeros[:, col] = col_scale[:, 0], col_zero[:, 0]
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    Q = Q[:, inv].float()
    scale, zero = column_qparams(scales, zeros, spec)
    return P.quantize(Q, scale, zero, spec), scale, zero
