"""Our GPU kernels as PyTorch custom operators (``torch.library``), so that ``torch.compile`` traces a
quantized model without graph breaks and CUDA graphs (``mode="reduce-overhead"``) capture it.

Each operator takes plain tensors (the weights already in the kernel's layout, made once when the module
moves to the GPU: ``QuantLinear``) and has a fake implementation that gives the output's shape and dtype
without running anything. The real implementations are the kernels' Python launchers.

* ``slimtorch::int4_linear(x, words, meta)``: int4 weight-only, tensor-core layout (``int4_mma``); up to
  ``int4_mma.MAX_M`` rows the mma kernel, more the wgmma GEMM (Hopper) or dequantize + cuBLAS.
* ``slimtorch::int8_linear(x, wq, w_scale)`` and ``slimtorch::fp8_linear(x, wq, w_scale)``: W8A8 with
  dynamic per-row activation quantization inside.
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


OPS = {"int4": int4_linear, "int8": int8_linear, "fp8": fp8_linear}
