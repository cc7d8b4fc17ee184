"""Sparsity patterns as pure functions: which weights to keep, given a score per weight.

A mask is a bool tensor of the weight's shape, True where the weight is kept. Patterns:

* unstructured: the ``sparsity`` fraction of lowest scores removed, per layer (:func:`unstructured_mask`),
  per output row (Wanda's comparison group, ``per_row=True``), or with one threshold over many layers
  (:func:`global_masks`);
* N:M (:func:`nm_mask`): in every run of ``m`` consecutive inputs of an output row, the ``n`` highest
  scores kept (2:4 is what sparse tensor cores run);
* block (:func:`block_mask`): (rows x cols) tiles kept or removed whole by their summed score.

Scores: :func:`magnitude` (``|W|``) and :func:`wanda` (``|W| * ||x_j||_2``, the input column norm).
Ties are broken by position (stable sort), so a mask is a function of its inputs alone.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise SlimError(f"sparsity must be in [0, 1); got {sparsity}")


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32 (the score of magnitude pruning)."""
    return weight.detach().abs().float()


def wanda(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's score |W_ij| * ||X_j||_2: ``weight`` (out, in), ``input_norm`` (in,) the L2 norm of each
    input feature over the calibration rows (conv weights flattened to (out, in*kh*kw) with unfolded inputs)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if input_norm.numel() != w.shape[1]:
        raise SlimError(f"wanda: {input_norm.numel()} input norms for a weight of {w.shape[1]} inputs")
    return (w.abs() * input_norm.float().reshape(1, -1)).reshape(weight.shape)


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask over the last dim of ``score`` (..., k): the ``keep`` highest of each row."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep all but the ``round(sparsity * n)`` lowest scores, over the whole tensor or per output row."""
    _check_sparsity(sparsity)
    s2 = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    keep = s2.shape[1] - round(sparsity * s2.shape[1])
    return _keep_top(s2, keep).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in each run of ``m`` consecutive inputs of each output row, keep the ``n`` highest scores."""
    if not 0 < n < m:
        raise SlimError(f"N:M sparsity needs 0 < N < M; got {n}:{m}")
    s2 = score.reshape(score.shape[0], -1)
    if s2.shape[1] % m:
        raise SlimError(f"N:M sparsity with M = {m} needs the inputs per row ({s2.shape[1]}) to be a multiple of M")
    return _keep_top(s2.reshape(s2.shape[0], -1, m), n).reshape(score.shape)


def block_mask(score: torch.Tensor, sparsity: float, block: tuple[int, int]) -> torch.Tensor:
    """Remove the ``round(sparsity * tiles)`` (rows x cols) tiles of lowest summed score."""
    _check_sparsity(sparsity)
    s2 = score.reshape(score.shape[0], -1)
    br, bc = block
    if br < 1 or bc < 1 or s2.shape[0] % br or s2.shape[1] % bc:
        raise SlimError(f"block sparsity: a {tuple(s2.shape)} weight does not tile into {br}x{bc} blocks")
    tiles = s2.reshape(s2.shape[0] // br, br, s2.shape[1] // bc, bc).sum((1, 3))
    keep = unstructured_mask(tiles, sparsity)
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1).reshape(score.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over every layer: the ``round(sparsity * total)`` lowest scores of all layers removed
    (scores must be comparable across layers: magnitude of similarly scaled weights, say)."""
    _check_sparsity(sparsity)
    names = list(scores)
    flat = torch.cat([scores[k].reshape(-1).float() for k in names])
    keep = _keep_top(flat.reshape(1, -1), flat.numel() - round(sparsity * flat.numel())).reshape(-1)
    out, i = {}, 0
    for k in names:
        n = scores[k].numel()
        out[k] = keep[i:i + n].reshape(scores[k].shape)
        i += n
    return out
