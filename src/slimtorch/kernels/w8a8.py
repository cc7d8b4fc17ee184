"""fp8 and int8 W8A8 linears: a Triton kernel quantizes activations per row (one read of x, one
write of the codes and scales), then a GEMM runs on the codes with both scales applied: int8 through a
Triton GEMM with an int32 accumulator and both scales applied in its epilogue (bf16 out: no int32
round trip through memory); fp8 through the same Triton GEMM (float32 accumulator) at few rows, and
``torch._scaled_mm`` (row-wise scales fused in its epilogue, bf16 out) from ``FP8_SCALED_MM_MIN_M`` rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtorch.spec import FP8_MAX


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                       BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    if ONE_PASS:  # the whole row fits in registers: read it once
        v = tl.load(x_ptr + row * stride_x + rk, mask=rk < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / QMAX
        tl.store(s_ptr + row, scale)
        v = v / scale
        if IS_INT:
            v = tl.extra.cuda.libdevice.rint(v)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + rk, v.to(q_ptr.dtype.element_ty), mask=rk < K)
        return
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
    block = triton.next_power_of_2(k)
    one_pass = block <= 16384
    _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=127.0 if is_int else FP8_MAX["fp8_e4m3"],
                             IS_INT=is_int, BLOCK_K=block if one_pass else 4096, ONE_PASS=one_pass,
                             num_warps=8 if block <= 8192 else 16)
    return q, s


FP8_SCALED_MM_MIN_M = 33
"""From this many rows fp8 runs ``torch._scaled_mm`` (cuBLASLt); below, the Triton GEMM of this module,
which keeps up with bf16 at few rows where cuBLASLt's fp8 did not (0.76-0.95x bf16 at M = 1 and 16 on the
H100 and H200 before: benchmarks/results/kernels.jsonl)."""


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16; wq (N, K) float8_e4m3fn; w_scale (N,) float32 -> (..., N) bf16."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] < FP8_SCALED_MM_MIN_M or x2.shape[1] % 16 or wq.shape[0] % 16:
        # _scaled_mm takes K and N in multiples of 16 only (a DiT's 2x2x1 patch embedding has K = 4)
        return _w8a8_mm(x2, wq, w_scale, torch.float8_e4m3fn).reshape(*x.shape[:-1], -1)
    xq, xs = quantize_rows(x2, torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def _mm_configs():
    out = []
    for bm, bn, bk, warps, stages in ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4),
                                      (64, 128, 128, 4, 4), (128, 256, 64, 8, 4), (256, 128, 128, 8, 3),
                                      (64, 64, 128, 4, 4), (64, 64, 256, 4, 3), (128, 64, 128, 4, 4),
                                      (16, 64, 256, 4, 4), (16, 128, 256, 4, 3), (32, 64, 256, 4, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                                 num_stages=stages))
    return out


def _mm_prune(configs, named_args, **kwargs):
    small = named_args["M"] <= 32
    return [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == small]


@triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K", "IS_INT"],
                 prune_configs_by={"early_config_prune": _mm_prune})
@triton.jit
def _w8a8_mm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, c_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
                    IS_INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """c (M, N) = (a (M, K) @ b (N, K)^T) * as (M,) * bs (N,), scales fused: int8 codes with an int32
    accumulator (IS_INT), or fp8 e4m3 codes with a float32 one."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_p = b_ptr + rn[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if IS_INT:
            a = tl.load(a_p, mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0)
            b = tl.load(b_p, mask=(rn[None, :] < N) & (k0 + rk[:, None] < K), other=0)
        else:  # an integer fill does not cast to fp8
            a = tl.load(a_p, mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0.0)
            b = tl.load(b_p, mask=(rn[None, :] < N) & (k0 + rk[:, None] < K), other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.int32 if IS_INT else tl.float32)
        a_p += BLOCK_K
        b_p += BLOCK_K
    sa = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(bs_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _w8a8_mm(x2: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x2 (M, K) bf16 quantized per row to ``dtype``, times wq (N, K) of that dtype, both scales applied."""
    m, k, n = x2.shape[0], x2.shape[1], wq.shape[0]
    xq, xs = quantize_rows(x2, dtype)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    bucket = 16 if m <= 16 else 32 if m <= 32 else 128 if m <= 128 else 2048

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _w8a8_mm_kernel[grid](xq, wq, xs, w_scale, y, m, n, k, bucket, xq.stride(0), wq.stride(0), y.stride(0),
                          IS_INT=dtype == torch.int8)
    return y


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16; wq (N, K) int8; w_scale (N,) float32 -> (..., N) bf16."""
    return _w8a8_mm(x.reshape(-1, x.shape[-1]), wq, w_scale, torch.int8).reshape(*x.shape[:-1], -1)
