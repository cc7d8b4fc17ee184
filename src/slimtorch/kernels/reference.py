"""Slow, obviously-right versions of the kernels: the oracle that kernel tests compare against.

Formats (shared with the kernels):
* int4 weight-only: codes 0..15 packed two per byte along K, low nibble = even k: ``packed (N, K/2)``
  uint8; per-group asymmetric ``scale``/``zero`` ``(N, K/G)`` float32; ``w = (q - zero) * scale``.
* fp8 / int8 W8A8: weight codes ``(N, K)`` (float8_e4m3fn / int8) with per-output-channel scales
  ``(N,)`` float32; activations quantized per row (token) at run time, symmetric.
"""

from __future__ import annotations

import torch

from slimtorch import packing
from slimtorch.spec import FP8_MAX


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) with values 0..15 -> (N, K/2) uint8, low nibble = even column: the saved-model
    format of packing.py, so a saved uint4 model's codes feed the kernel as they are."""
    return packing.pack(codes, 4, 0)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    return packing.unpack(packed, 4, 0, 2 * packed.shape[-1]).to(torch.uint8)


def quantize_int4_weight(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint4 RTN per group of ``group`` inputs: (packed, scale, zero) for a (N, K) weight."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).reshape(n, k)
    return pack_int4(q), scale, zero


def int4_weight_only_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                                zero: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (..., N): dequantize in float32, matmul in float32, cast to x's dtype."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    group = k // scale.shape[1]
    w = ((q.reshape(n, -1, group) - zero[..., None]) * scale[..., None]).reshape(n, k)
    return (x.float() @ w.T).to(x.dtype)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of x (M, K) to fp8 e4m3 or int8: (codes, scale (M, 1) float32)."""
    amax = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    if dtype == torch.int8:
        scale = amax / 127.0
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
    fmax = FP8_MAX["fp8_e4m3"]  # float8_e4m3fn
    scale = amax / fmax
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype), scale


def quantize_weight_channels(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric weight quantization: (codes (N, K), scale (N,) float32)."""
    codes, scale = quantize_rows(w, dtype)
    return codes, scale.reshape(-1)


def w8a8_linear_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row activation quantization (the weight's dtype), then the float product of the codes."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(x2, wq.dtype)
    y = (xq.float() @ wq.float().T) * xs * w_scale[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
