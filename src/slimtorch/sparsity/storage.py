"""Sparse tensor storage: a bitmask of the nonzero positions (one bit per element, packed little-end first
into bytes, row-major) and the nonzero values in order, the layout of compressed-tensors' ``sparse-bitmask``
without its row offsets. At 50% sparsity a bf16/fp16 weight takes 56% of its dense bytes, a float32 one 53%.

:func:`worth_compressing` says when the pair is smaller than the dense tensor (more zeros than one bit per
element costs). :func:`decompress` checks everything a damaged file could get wrong.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def compress(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask uint8 (ceil(numel / 8),), values (nnz,) in t's dtype) of ``t``."""
    flat = t.detach().reshape(-1)
    nz = flat != 0
    bits = torch.nn.functional.pad(nz.to(torch.uint8), (0, -flat.numel() % 8)).reshape(-1, 8)
    return (bits * _BITS).sum(1, dtype=torch.uint8), flat[nz]  # boolean indexing copies


def decompress(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], what: str = "tensor") -> torch.Tensor:
    """The dense tensor of ``shape`` (values' dtype) from :func:`compress`'s pair; SlimError if they disagree."""
    n = int(torch.Size(shape).numel())
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != -(-n // 8):
        raise SlimError(f"{what}: its bitmask must be {-(-n // 8)} bytes (uint8) for shape {list(shape)}")
    every = ((bitmask.unsqueeze(1) & _BITS) != 0).reshape(-1)
    if bool(every[n:].any()):
        raise SlimError(f"{what}: its bitmask has bits set past the tensor's end")
    nz = every[:n]
    if values.dim() != 1 or values.numel() != int(nz.sum()):
        raise SlimError(f"{what}: {values.numel()} stored values for {int(nz.sum())} set bits in its bitmask")
    out = torch.zeros(n, dtype=values.dtype)
    out[nz] = values
    return out.reshape(shape)


def worth_compressing(t: torch.Tensor) -> bool:
    """Whether bitmask + values is smaller than ``t`` dense."""
    nnz = int((t != 0).sum())
    return -(-t.numel() // 8) + nnz * t.element_size() < t.numel() * t.element_size()
