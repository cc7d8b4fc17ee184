"""Our GPU kernels as PyTorch custom operators (``torch.library``), so that ``torch.compile`` traces a
quantized model without graph breaks and CUDA graphs (``mode="reduce-overhead"``) capture it.

Each operator takes plain tensors (the weights already in the kernel's layout, made once when the module
moves to the GPU: ``QuantLinear``) and has a fake implementation that gives the output's shape and dtype
without running anything. The real implementations are the kernels' Python launchers.

* ``slimtorch::int4_linear(x, words, meta)``: int4 weight-only, tensor-core layout (``int4_mma``); up to
  ``int4_mma.MAX_M`` rows the mma kernel, more the wgmma GEMM (Hopper) or dequantize + cuBLAS.
* ``slimtorch::int8_linear(x, wq, w_scale)`` and ``slimtorch::fp8_linear(x, wq, w_scale)``: W8A8 with
  dynamic per-row activation quantization inside.
* ``slimtorch::w4a8_linear(x, packed, scale, words, meta)``: int4 weights, int8 activations at many rows,
  weight-only at few (``dispatch.W4A16_MAX_M``).
* ``slimtorch::quantize_rows(x, fp8)``: the per-row activation quantization on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("slimtorch::int4_linear", mutates_args=())
def int4_linear(x: Tensor, words: Tensor, meta: Tensor) -> Tensor:
    """x (..., K) bf16 -> (..., N) bf16 with an int4 weight in the tensor-core layout."""
    from slimtorch.kernels.dispatch import int4_linear as run
    from slimtorch.kernels.int4_mma import Int4MMAWeight

    k = words.shape[1] * 128
    return run(x, Int4MMAWeight(words, meta, k // meta.shape[1]))


@int4_linear.register_fake
def _int4_linear_fake(x: Tensor, words: Tensor, meta: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], words.shape[0] * 16))


@torch.library.custom_op("slimtorch::int8_linear", mutates_args=())
def int8_linear(x: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    """x (..., K) bf16; wq (N, K) int8; w_scale (N,) float32 -> (..., N) bf16."""
    from slimtorch.kernels.w8a8 import int8_linear as run

    return run(x, wq, w_scale)


@torch.library.custom_op("slimtorch::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    """x (..., K) bf16; wq (N, K) float8_e4m3fn; w_scale (N,) float32 -> (..., N) bf16."""
    from slimtorch.kernels.w8a8 import fp8_linear as run

    return run(x, wq, w_scale)


@int8_linear.register_fake
def _int8_linear_fake(x: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@fp8_linear.register_fake
def _fp8_linear_fake(x: Tensor, wq: Tensor, w_scale: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@torch.library.custom_op("slimtorch::w4a8_linear", mutates_args=())
def w4a8_linear(x: Tensor, packed: Tensor, scale: Tensor, words: Tensor, meta: Tensor) -> Tensor:
    """x (..., K) bf16 -> (..., N) bf16: int4 weight-only (``words``, ``meta``) up to
    ``dispatch.W4A16_MAX_M`` rows, else W4A8 on the int8 tensor cores (``packed``, ``scale``)."""
    from slimtorch.kernels.dispatch import W4A16_MAX_M
    from slimtorch.kernels.dispatch import int4_linear as run4
    from slimtorch.kernels.int4_mma import Int4MMAWeight
    from slimtorch.kernels.w4a8 import w4a8_linear as run8

    if x.numel() <= W4A16_MAX_M * x.shape[-1]:
        return run4(x, Int4MMAWeight(words, meta, words.shape[1] * 128 // meta.shape[1]))
    return run8(x, packed, scale)


@w4a8_linear.register_fake
def _w4a8_linear_fake(x: Tensor, packed: Tensor, scale: Tensor, words: Tensor, meta: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("slimtorch::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (codes (M, K) int8, or float8_e4m3fn with ``fp8``; scale (M, 1) float32), symmetric per
    row: the activation quantization that the W8A8 and W4A8 kernels run inside."""
    from slimtorch.kernels.w8a8 import quantize_rows as run

    return run(x, torch.float8_e4m3fn if fp8 else torch.int8)


@quantize_rows.register_fake
def _quantize_rows_fake(x: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8), \
        x.new_empty((m, 1), dtype=torch.float32)


OPS = {"int4": int4_linear, "int8": int8_linear, "fp8": fp8_linear, "w4a8": w4a8_linear}
