"""fp8 and int8 W8A8 linears: a Triton kernel quantizes activations per row (one read of x, one
write of the codes and scales), then the vendor GEMM runs on the codes with both scales applied:
fp8 through ``torch._scaled_mm`` (row-wise scales fused in its epilogue, bf16 out), int8 through
``torch._int_mm`` (int32 out) and a Triton epilogue that applies the scales and casts to bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_x + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_x + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32) / scale
        if IS_INT:
            v = tl.extra.cuda.libdevice.rint(v)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + k0 + rk, v.to(q_ptr.dtype.element_ty), mask=k0 + rk < K)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (codes (M, K) of ``dtype``, scale (M, 1) float32), symmetric per row."""
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=dtype)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    is_int = dtype == torch.int8
    _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=127.0 if is_int else 448.0,
                             IS_INT=is_int, BLOCK_K=min(4096, triton.next_power_of_2(k)), num_warps=8)
    return q, s


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16; wq (N, K) float8_e4m3fn; w_scale (N,) float32 -> (..., N) bf16."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(x2, torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], -1)


@triton.jit
def _dequant_kernel(acc_ptr, xs_ptr, ws_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], (acc * xs[:, None] * ws[None, :]).to(y_ptr.dtype.element_ty),
             mask=mask)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16; wq (N, K) int8; w_scale (N,) float32 -> (..., N) bf16."""
    x2 = x.reshape(-1, x.shape[-1])
    m, n = x2.shape[0], wq.shape[0]
    xq, xs = quantize_rows(x2, torch.int8)
    if m <= 16:  # _int_mm needs M > 16: pad
        xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, wq.t())[:m]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _dequant_kernel[(triton.cdiv(m, 64), triton.cdiv(n, 128))](acc, xs, w_scale, y, m, n, BLOCK_M=64, BLOCK_N=128)
    return y.reshape(*x.shape[:-1], n)
