"""int4 weight-only linear (groups of 128, asymmetric, two codes per byte) in Triton.

One kernel, two regimes:
* one row (decode, batch 1): a GEMV that streams each ``BLOCK_N x K`` slab of packed weights once and
  never materialises dequantized weights: per group ``s * (q . x - z * sum x)``, with the low and
  high nibbles multiplied by the even and odd entries of x. Memory-bound: time ~ N*K/2 / bandwidth.
* up to ``DEQUANT_FROM_M`` rows: a tiled GEMM whose weight tiles are dequantized in registers.
* more rows (prefill): dequantize once to bf16 and call cuBLAS; the dequantization costs a pass
  over the weights, small next to a compute-bound GEMM.

Format: see reference.py (``packed (N, K/2)`` uint8, ``scale``/``zero`` ``(N, K/G)`` float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _mm_configs():
    out = []
    for bm in (16, 32, 64):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (3, 4):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=warps,
                                             num_stages=stages))
    return out


def _mm_prune(configs, named_args, **kwargs):
    m = named_args["M"]
    want = 16 if m <= 16 else 32 if m <= 32 else 64
    return [c for c in configs if c.kwargs["BLOCK_M"] == want]


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 128 if m <= 128 else 1024


@triton.jit
def _nibble_f32(words, i: tl.constexpr):
    """Nibble ``i`` of each int32 word as float32, without an int->float conversion: OR the 4 bits into
    the mantissa of 2^23 and subtract 2^23."""
    q = (words >> (4 * i)) & 0xF
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


def _gemv_prune(configs, named_args, **kwargs):
    groups = named_args["K"] // 128
    return [c for c in configs if groups % c.kwargs["CHUNK"] == 0] or configs[:1]


@triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "CHUNK": ch}, num_warps=w)
                          for bn in (16, 32, 64) for ch in (1, 2, 4, 8) for w in (1, 2, 4, 8)],
                 key=["N", "K"], prune_configs_by={"early_config_prune": _gemv_prune})
@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """One activation row: y[n] = sum_g s[n,g] * (sum_k q[n,k] x[k] - z[n,g] * sum_k x[k]) over each group.

    The packed weight is read as int32 words (8 codes each; code i of word j is k = 8j + i), CHUNK
    groups per step, so that many loads are in flight at once (a GEMV is latency-bound otherwise);
    products accumulate in a tile reduced once at the end."""
    W: tl.constexpr = GROUP // 8  # words per group
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rc = tl.arange(0, CHUNK)
    rj = tl.arange(0, W)
    acc = tl.zeros((BLOCK_N, CHUNK, W), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    for g0 in range(0, K // GROUP, CHUNK):
        cols = (g0 + rc)[:, None] * W + rj[None, :]  # (CHUNK, W) word index
        words = tl.load(w_ptr + rn[:, None, None] * stride_wn + cols[None, :, :], mask=n_mask[:, None, None],
                        other=0)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (g0 + rc)[None, :], mask=n_mask[:, None], other=0.0)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + (g0 + rc)[None, :], mask=n_mask[:, None], other=0.0)
        part = tl.zeros((BLOCK_N, CHUNK, W), dtype=tl.float32)
        xsum = tl.zeros((CHUNK, W), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + cols * 8 + i).to(tl.float32)  # (CHUNK, W)
            part += _nibble_f32(words, i) * xi[None, :, :]
            xsum += xi
        acc += part * s[:, :, None]
        zacc += s * z * tl.sum(xsum, axis=1)[None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(zacc, axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _mm_prune})
@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Several activation rows: low and high nibbles are dequantized as two (BLOCK_N, BLOCK_K/2) bf16 tiles
    and multiplied with the even and odd columns of x (no interleaving in registers)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wp = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + rj)[None, :], mask=n_mask[:, None], other=0)
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_mask, other=0.0)[:, None]
        z = tl.load(z_ptr + rn * stride_sn + g, mask=n_mask, other=0.0)[:, None]
        w32 = wp.to(tl.int32)
        lo = ((_nibble_f32(w32, 0) - z) * s).to(tl.bfloat16)
        hi = ((_nibble_f32(w32, 1) - z) * s).to(tl.bfloat16)
        xe = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + 2 * rj)[:, None], mask=m_mask[None, :], other=0.0)
        xo = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + 2 * rj + 1)[:, None], mask=m_mask[None, :], other=0.0)
        acc = tl.dot(lo, xe, acc)
        acc = tl.dot(hi, xo, acc)
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
    if m == 1:
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
        words = packed.view(torch.int32)  # (N, K/8): 8 codes per word, little-endian
        _int4_gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x2, words, scale, zero, y, n, k, words.stride(0), scale.stride(0), GROUP=group)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"])

    _int4_kernel[grid](x2, packed, scale, zero, y, m, n, k, _m_bucket(m), x2.stride(0), packed.stride(0),
                       scale.stride(0), y.stride(0), GROUP=group)
    return y.reshape(*x.shape[:-1], n)
