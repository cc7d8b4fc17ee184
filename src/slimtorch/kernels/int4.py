"""int4 weight-only linear (groups of 128, asymmetric, two codes per byte) in Triton.

One kernel, two regimes:
* decode (M <= 16): memory-bound; each program streams a ``BLOCK_N x K`` slab of packed weights
  once, dequantizes it in registers and reduces against the few activation rows. Weight bytes
  dominate, so time ~ N*K/2 / bandwidth: about 4x less than bf16 for the weights alone.
* prefill (larger M): the same dequantize-in-registers tiles feed ``tl.dot`` (a tiled GEMM).

Format: see reference.py (``packed (N, K/2)`` uint8, ``scale``/``zero`` ``(N, K/G)`` float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs():
    out = []
    for bn in (32, 64, 128):  # decode
        for warps in (4, 8):
            for stages in (3, 4, 6):
                out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=warps,
                                         num_stages=stages))
    for bm in (64, 128):  # prefill
        for bn in (64, 128):
            for bk in (64, 128):
                for stages in (3, 4):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8,
                                             num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    m = named_args["M"]
    want = (16,) if m <= 16 else (64,) if m <= 128 else (64, 128)
    return [c for c in configs if c.kwargs["BLOCK_M"] in want]


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 128 if m <= 128 else 2048


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk2 = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wp = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + rk2)[None, :], mask=n_mask[:, None], other=0)
        q = tl.join(wp & 0xF, wp >> 4).reshape(BLOCK_N, BLOCK_K)  # low nibble = even k
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + rn * stride_sn + g, mask=n_mask, other=0.0)
        w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(tl.bfloat16)  # (BLOCK_N, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + rk)[:, None], mask=m_mask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)  # (BLOCK_N, BLOCK_M): the dequantized tile is the register operand
    tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = rn < N
    wp = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :],
                 mask=n_mask[:, None], other=0)
    q = tl.join(wp & 0xF, wp >> 4).reshape(BLOCK_N, BLOCK_K)
    s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)
    z = tl.load(z_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)
    w = (q.to(tl.float32) - z[:, None]) * s[:, None]
    tl.store(out_ptr + rn[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None])


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (N, K) weight in ``dtype``."""
    n, k = packed.shape[0], packed.shape[1] * 2
    group = k // scale.shape[1]
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(n, 32), k // 128)](packed, scale, zero, out, n, k, packed.stride(0),
                                                    scale.stride(0), GROUP=group, BLOCK_N=32, BLOCK_K=128,
                                                    num_warps=4)
    return out


# from this many rows on, dequantizing to bf16 once and calling cuBLAS beats the fused kernel
# (measured on an H200: benchmarks/results/kernels.jsonl)
DEQUANT_FROM_M = 1024


def int4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                            zero: torch.Tensor, fused_only: bool = False) -> torch.Tensor:
    """x (..., K) bf16 -> (..., N) bf16 with the int4 weight (see reference.py for the format)."""
    k = x.shape[-1]
    n = packed.shape[0]
    group = k // scale.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m >= DEQUANT_FROM_M and not fused_only:
        return torch.nn.functional.linear(x, dequantize_int4(packed, scale, zero, x.dtype))
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"])

    _int4_kernel[grid](x2, packed, scale, zero, y, m, n, k, _m_bucket(m), x2.stride(0), packed.stride(0),
                       scale.stride(0), y.stride(0), GROUP=group)
    return y.reshape(*x.shape[:-1], n)
