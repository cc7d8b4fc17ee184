"""Which GPU kernel runs a quantized linear, and its weights in that kernel's layout.

``linear_kernel(wspec, act, qweight, scale, zero)`` looks at the specs: int4/uint4 groups (weight
only), int8 per-channel weights with dynamic per-token int8 activations, fp8 e4m3 per-channel
weights with dynamic per-token fp8 activations, and signed int4 groups with dynamic per-token int8
activations (W4A8) have kernels; anything else returns None and the
module keeps its reference (dequantize + float matmul) path. The returned function takes bf16
activations of shape (..., K); the kernels quantize activations themselves, as the module's
dynamic activation quantizer would (symmetric, per row).

int4 weights go to the NVRTC kernels (``int4_linear`` picks one by the number of rows). Where NVRTC
cannot compile them (no NVRTC, a GPU older than sm_80, a torch without ``_compile_kernel``), the
Triton kernels of ``int4.py`` are the fallback (tested in tests/kernels against the reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from slimtorch.spec import PerChannel, PerGroup, PerToken, QuantSpec

KernelFn = Callable[[torch.Tensor], torch.Tensor]


def _dynamic_rows(act: QuantSpec | None, dtype: str) -> bool:
    return (act is not None and act.dtype == dtype and act.dynamic and act.symmetric
            and isinstance(act.granularity, PerToken))


def kernel_kind(wspec: QuantSpec, act: QuantSpec | None) -> str | None:
    """"int4", "int8", "fp8", "w4a8", or None when no kernel implements this pair of specs."""
    if wspec.dtype in ("uint4", "int4") and isinstance(wspec.granularity, PerGroup) and act is None:
        return "int4"
    per_channel = isinstance(wspec.granularity, PerChannel) and wspec.granularity.axis == 0 and wspec.symmetric
    if per_channel and wspec.dtype == "int8" and _dynamic_rows(act, "int8"):
        return "int8"
    if per_channel and wspec.dtype == "fp8_e4m3" and _dynamic_rows(act, "fp8_e4m3"):
        return "fp8"
    if wspec.dtype == "int4" and wspec.symmetric and isinstance(wspec.granularity, PerGroup) \
            and wspec.granularity.size % 128 == 0 and _dynamic_rows(act, "int8"):
        return "w4a8"
    return None


def kernel_weights(wspec: QuantSpec, act: QuantSpec | None, qweight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """The custom operator (``kernels.ops.OPS`` key) that runs this layer and the weight tensors it takes,
    in its layout (made once, on the weights' CUDA device); None where no operator applies (then
    :func:`linear_kernel` may still find the Triton fallback).

    A W4A8 layer holds its int4 weight twice (0.5 byte per weight each): packed for the int8 tensor-core
    GEMM, and in the weight-only kernel's layout, which runs it at few rows (``ops.w4a8_linear``)."""
    kind = kernel_kind(wspec, act)
    if kind is None or not qweight.is_cuda:
        return None
    n, k = qweight.shape
    if kind in ("int4", "w4a8"):
        from slimtorch.kernels import int4_mma
        from slimtorch.kernels.reference import pack_int4

        g = wspec.granularity.size
        offset = 8 if wspec.dtype == "int4" else 0  # signed codes -8..7 -> 0..15, zero-point moved alike
        zero2 = zero.reshape(n, k // g).float() + offset
        if not (int4_mma.mma_supported(qweight.device) and int4_mma.layout_supported(n, k, g, zero2)):
            return None
        codes = (qweight.to(torch.int16) + offset).to(torch.uint8)
        wm = int4_mma.prepare_int4_mma(pack_int4(codes), scale.reshape(n, k // g), zero2)
        if kind == "int4":
            return "int4", (wm.words, wm.meta)
        from slimtorch.kernels.w4a8 import pack_w4a8

        return "w4a8", (pack_w4a8(qweight), scale.reshape(n, k // g).float().contiguous(), wm.words, wm.meta)
    return kind, (qweight.contiguous(), scale.reshape(n).float().contiguous())


def eager_kernel(kind: str, weights: tuple[torch.Tensor, ...]) -> KernelFn:
    """The eager form of custom operator ``kind`` on ``weights`` from :func:`kernel_weights`: the same
    computation without the operator's dispatch (``QuantLinear`` calls it outside ``torch.compile``; for
    int4, launches bound once per input shape: ``int4_mma.Int4Eager``)."""
    from slimtorch.kernels.int4_mma import Int4Eager, Int4MMAWeight

    if kind == "int4":
        return Int4Eager(Int4MMAWeight(*weights, weights[0].shape[1] * 128 // weights[1].shape[1]), int4_linear)
    if kind == "w4a8":
        packed, scale, words, meta = weights
        small = Int4Eager(Int4MMAWeight(words, meta, words.shape[1] * 128 // meta.shape[1]), int4_linear)
        return W4A8Eager(packed, scale, small)
    from slimtorch.kernels.w8a8 import fp8_linear, int8_linear

    return functools.partial(int8_linear if kind == "int8" else fp8_linear, wq=weights[0], w_scale=weights[1])


W4A16_MAX_M = 32
"""A W4A8 layer runs its int4 weight as weight-only (bf16 activations, the tensor-core kernel of
``int4_mma``) up to this many rows, where reading the weight is the cost and quantizing the activations
would only add a kernel and error; above it, the int8 tensor-core GEMM (``w4a8``)."""


class W4A8Eager:
    """A W4A8 layer's eager call: weight-only int4 at few rows, W4A8 above (:data:`W4A16_MAX_M`)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, small: KernelFn) -> None:
        self.packed, self.scale, self.small = packed, scale, small

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= W4A16_MAX_M * x.shape[-1]:
            return self.small(x)
        from slimtorch.kernels.w4a8 import w4a8_linear

        return w4a8_linear(x, self.packed, self.scale)


def linear_kernel(wspec: QuantSpec, act: QuantSpec | None, qweight: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor) -> KernelFn | None:
    """A function x (..., K) bf16 -> (..., N) bf16 running the kernel on these weights (CUDA tensors),
    or None where no kernel applies (specs, or shapes the kernel does not take): the eager form of the
    custom operator (:func:`kernel_weights`), else for int4 the Triton fallback."""
    got = kernel_weights(wspec, act, qweight, scale, zero)
    if got is not None:
        return eager_kernel(*got)
    if kernel_kind(wspec, act) != "int4" or not qweight.is_cuda:
        return None
    from slimtorch.kernels.int4 import int4_weight_only_linear
    from slimtorch.kernels.int4_layout import prepare_int4, supported
    from slimtorch.kernels.reference import pack_int4

    n, k = qweight.shape
    g = wspec.granularity.size
    if not supported(n, k, g):
        return None
    offset = 8 if wspec.dtype == "int4" else 0  # signed codes -8..7 -> 0..15, zero-point moved alike
    codes = (qweight.to(torch.int16) + offset).to(torch.uint8)
    w = prepare_int4(pack_int4(codes), scale.reshape(n, k // g), zero.reshape(n, k // g).float() + offset)
    return lambda x: int4_weight_only_linear(x, w)


def int4_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype, for an int4 weight ``w`` in the tensor-core layout
    (``int4_mma.Int4MMAWeight``). bf16 x with up to ``int4_mma.MAX_M`` rows: the tensor-core kernel of
    ``int4_mma``; more rows on Hopper: the wgmma GEMM of ``int4_gemm``, which reads the same layout and
    needs no bf16 copy of the weight (benchmarks/notes/int4_kernel.md has its speed). Otherwise the
    weight is dequantized to bf16 once and cuBLAS multiplies (compute-bound there)."""
    from slimtorch.kernels import int4_gemm, int4_mma

    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dtype == torch.bfloat16 and 0 < m <= int4_mma.MAX_M:
        return int4_mma.int4_mma_linear(x, w)
    if x.dtype == torch.bfloat16 and m > 0 and int4_gemm.gemm_supported(x.device, w):
        return int4_gemm.int4_gemm(x, w)
    return torch.nn.functional.linear(x, int4_mma.dequantize_int4_mma(w).to(x.dtype))
