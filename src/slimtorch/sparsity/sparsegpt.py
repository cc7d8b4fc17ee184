"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column with the optimal-brain-surgeon
update, choosing the mask adaptively per block of columns, optionally quantizing the kept weights in the
same pass (joint sparsity + quantization, as in the paper).

Why not prune then GPTQ: the OBS update that compensates a removed weight is the same update GPTQ uses
for a rounding error, so one pass over the columns (with the inverse Hessian's Cholesky factor, lazy batch
updates of ``block_size`` columns) handles both. The Hessian is GPTQ's (:class:`slimtorch.calib.gptq.Hessian`).

The mask of a block is chosen once per block (unstructured: the lowest ``w^2 / [H^-1]_jj^2`` of the
block's columns, at the target sparsity) or per run of M columns (N:M), from the weights as updated so far.
"""

from __future__ import annotations

import torch

from slimtorch.calib.gptq import (
    column_qparams,
    column_spec,
    fit_columns,
    inverse_hessian_factor,
)
from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.spec import PerGroup, QuantSpec


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01,
                    quant: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """SparseGPT for one weight.

    Args:
        weight: (out, in) float weight (conv weights flattened to (out, in*kh*kw)).
        H: (in, in) Hessian of the layer's inputs (``2/n X^T X``).
        sparsity: fraction removed (unstructured); ignored when ``nm`` is given.
        nm: (N, M): keep N of every M consecutive inputs of each row.
        block_size: columns per lazy batch update (and per unstructured mask choice).
        damp: fraction of the mean Hessian diagonal added to its diagonal.
        quant: a weight spec to quantize the kept weights with in the same pass (per tensor, per channel or
            per group; a group's parameters are fitted when the pass reaches it, as GPTQ does).

    Returns:
        (new weight (out, in) float32 with zeros at removed positions, keep mask (out, in) bool, and with
        ``quant`` the (codes, scale, zero) of the new weight in primitives.py's shapes, else None).
    """
    W = weight.detach().double().clone()
    out_f, in_f = W.shape
    if nm is not None:
        n, m = nm
        if not 0 < n < m or in_f % m:
            raise SlimError(f"SparseGPT {n}:{m}: needs 0 < N < M and the inputs ({in_f}) a multiple of M")
        if block_size % m:
            raise SlimError(f"SparseGPT {n}:{m}: the block size ({block_size}) must be a multiple of M")
    elif not 0.0 <= sparsity < 1.0:
        raise SlimError(f"sparsity must be in [0, 1); got {sparsity}")
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, damp, "SparseGPT")
    group = quant.granularity.size if quant is not None and isinstance(quant.granularity, PerGroup) else None
    if quant is not None:
        colspec = column_spec(quant)
        scales = torch.zeros(out_f, in_f, dtype=torch.float32)
        zeros = torch.zeros(out_f, in_f, dtype=torch.float32)
        if group is None:
            scale, zero = fit_columns(W, quant)
    pruned = torch.zeros(out_f, in_f, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True: removed
        if nm is None and sparsity > 0:
            sal = (W1 ** 2 / d.reshape(1, -1) ** 2).reshape(-1)
            drop = round(sparsity * sal.numel())
            order = torch.sort(sal, stable=True).indices[:drop]
            mask1.view(-1)[order] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].reshape(1, -1) ** 2
                low = torch.sort(sal, dim=1, stable=True).indices[:, :nm[1] - nm[0]]
                mask1[:, i:i + nm[1]].scatter_(1, low, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0.0
            if quant is not None:
                col = i1 + i
                if group is not None and col % group == 0:
                    scale, zero = fit_columns(W1[:, i:i + group] if i + group <= W1.shape[1]
                                              else torch.cat([W1[:, i:], W[:, i2:col + group]], 1), quant)
                scales[:, col], zeros[:, col] = scale[:, 0], zero[:, 0]
                qq = P.dequantize(P.quantize(q.float().reshape(-1, 1), scale, zero, colspec), scale, zero, colspec)
                q = torch.where(mask1[:, i], q, qq.reshape(-1).double())
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = W.float()
    if quant is None:
        return W, ~pruned, None
    scale, zero = column_qparams(scales, zeros, quant)
    return W, ~pruned, (P.quantize(W, scale, zero, quant), scale, zero)
