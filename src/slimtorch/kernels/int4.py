"""int4 weight-only linear (groups of 128, asymmetric) in Triton: the fallback where the NVRTC kernels
(``int4_mma``, ``int4_gemm``) cannot be compiled (``dispatch.linear_kernel`` decides; tests/kernels checks
both against the reference).

The weights come in the kernels' layout, :class:`~slimtorch.kernels.int4_layout.Int4Weight` (made once
per layer by :func:`~slimtorch.kernels.int4_layout.prepare_int4`; that module needs no Triton).

A code q is turned into the float ``1 + q/16`` with two integer operations (shift it into the top
four mantissa bits, then one AND/OR with the bits of 1.0), no int-to-float conversion:
``s * (q - z) = a * (1 + q/16) - (a + b)``, and in a dot product
``sum s (q - z) x = a * (sum (1 + q/16) x - sum x) - b * sum x``.

Three paths, by the number of activation rows M:

* M = 1 (decode): a GEMV on the CUDA cores that streams the packed weight once; memory-bound.
* M below ``DEQUANT_FROM_M``: a tiled GEMM whose weight tiles are dequantized in registers and fed to
  the tensor cores as eight K=16 products per group (one per code position in a word), optionally
  split over K (fp32 partial sums added atomically) so that small M still fills the chip.
* more rows (prefill): dequantize once to bf16 and call cuBLAS; the extra pass over the weights is
  small next to a compute-bound GEMM.

Each launch takes its block sizes from :func:`gemv_config` / :func:`mm_config` (picked from the
measurements in benchmarks/results/kernels.jsonl) and calls the compiled kernel directly, without
an autotuner in the call path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtorch.kernels.int4_layout import Int4Weight, prepare_int4, supported  # noqa: F401 (re-exported)
from slimtorch.kernels.triton_launch import launch as _launch


@triton.jit
def _unit(words, i: tl.constexpr):
    """Code i of each int32 word as the float 1 + q/16: the 4 bits moved to mantissa bits 19..22."""
    if 4 * i <= 19:
        t = words << (19 - 4 * i)
    else:
        t = words >> (4 * i - 19)
    return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _cols(rn, rows):
    """Offsets of channels rn in a blocked (N/16, rows, 16) array, row 0."""
    return (rn // 16) * (rows * 16) + rn % 16


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 CHUNK: tl.constexpr, STAGES: tl.constexpr):
    """y[n] = sum_k x[k] w[n, k] for one row x; each step reads CHUNK groups x BLOCK_N channels."""
    W: tl.constexpr = GROUP // 8  # words per group
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wcol = _cols(rn, K // 8)
    mcol = _cols(rn, K // GROUP)
    rc = tl.arange(0, CHUNK)
    rw = tl.arange(0, W)
    acc = tl.zeros((CHUNK, W, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, K // (GROUP * CHUNK), num_stages=STAGES):
        g = step * CHUNK + rc
        j = g[:, None] * W + rw[None, :]  # (CHUNK, W) word rows
        words = tl.load(w_ptr + j[:, :, None] * 16 + wcol[None, None, :])
        a = tl.load(a_ptr + g[:, None] * 16 + mcol[None, :])[:, None, :]
        b = tl.load(b_ptr + g[:, None] * 16 + mcol[None, :])[:, None, :]
        part = tl.zeros((CHUNK, W, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((CHUNK, W), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + j * 8 + i).to(tl.float32)
            part += _unit(words, i) * xi[:, :, None]
            xsum += xi
        acc += a * (part - xsum[:, :, None]) - b * xsum[:, :, None]
    y = tl.sum(tl.sum(acc, axis=0), axis=0)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _mm_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """y (M, N) = x (M, K) @ w^T, one group (K = GROUP) per step as 8 products of K = 16: code position i
    of every word in the group against columns 8j + i of x. With SPLIT_K > 1, y is a zeroed float32
    buffer and each program adds its share of the groups atomically."""
    W: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wcol = _cols(rn, K // 8)
    mcol = _cols(rn, K // GROUP)
    rw = tl.arange(0, W)
    m_mask = rm < M
    groups = K // GROUP
    per = tl.cdiv(groups, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in tl.range(pid_k * per, tl.minimum(pid_k * per + per, groups), num_stages=STAGES):
        words = tl.load(w_ptr + (g * W + rw)[:, None] * 16 + wcol[None, :])
        a = tl.load(a_ptr + g * 16 + mcol)[None, :]
        c = a + tl.load(b_ptr + g * 16 + mcol)[None, :]
        for i in tl.static_range(8):
            wi = (_unit(words, i) * a - c).to(tl.bfloat16)  # (W, BLOCK_N): rows k = g*GROUP + 8j + i
            xi = tl.load(x_ptr + rm[:, None] * stride_xm + (g * GROUP + 8 * rw + i)[None, :],
                         mask=m_mask[:, None], other=0.0)
            acc = tl.dot(xi.to(tl.bfloat16), wi, acc)
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        tl.atomic_add(ptrs, acc, mask=m_mask[:, None], sem="relaxed")


@triton.jit
def _dequant_kernel(w_ptr, a_ptr, b_ptr, out_ptr, N, K, stride_o, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (K, N) = w^T dequantized, one group of rows per program column."""
    W: tl.constexpr = GROUP // 8
    g = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, W)
    words = tl.load(w_ptr + (g * W + rw)[:, None] * 16 + _cols(rn, K // 8)[None, :])
    mcol = _cols(rn, K // GROUP)
    a = tl.load(a_ptr + g * 16 + mcol)[None, :]
    c = a + tl.load(b_ptr + g * 16 + mcol)[None, :]
    for i in tl.static_range(8):
        wi = _unit(words, i) * a - c
        tl.store(out_ptr + (g * GROUP + 8 * rw + i)[:, None] * stride_o + rn[None, :], wi.to(out_ptr.dtype.element_ty))


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The transposed weight ``(K, N)`` in ``dtype`` (``x @ result`` is the linear)."""
    out = torch.empty(w.k, w.n, device=w.words.device, dtype=dtype)
    block = 128 if w.n % 128 == 0 else 16
    _launch(_dequant_kernel, (w.n // block, w.k // w.group), (w.words, w.a, w.b, out, w.n, w.k, out.stride(0)),
            {"GROUP": w.group, "BLOCK_N": block, "num_warps": 4})
    return out


# From this many rows on, dequantize to bf16 once and call cuBLAS: the tiled kernel (eight K = 16
# products per group) wins at M <= 16 (1.2x bf16 on an H100) but fell to 0.14x bf16 at M = 128.
DEQUANT_FROM_M = 17


def gemv_config(n: int, k: int, group: int = 128) -> dict | None:
    """Block sizes of the M = 1 kernel (BLOCK_N, CHUNK, STAGES, num_warps), or None where the split-K
    tiled kernel is faster at M = 1: when the number of groups is not a multiple of 4 (K = 11008 has 86
    groups of 128), the GEMV can read only 1 or 2 groups a step (benchmarks/results/int4_sweep.jsonl,
    H100). CHUNK always divides the number of groups: the kernel's loop has no remainder step."""
    groups = k // group
    if groups % 4:
        return None
    return {"BLOCK_N": 16, "CHUNK": 8 if groups % 8 == 0 and n <= 4096 else 4, "STAGES": 3, "num_warps": 4}


def mm_config(m: int, n: int, k: int, group: int = 128) -> dict:
    """Block sizes of the tiled kernel (BLOCK_M, BLOCK_N, SPLIT_K, STAGES, num_warps): enough programs
    (split over K where the tiles are few) to keep every SM streaming weights. Best on an H100 for
    M <= 16 at every benchmark shape: 16 x 128 tiles, K split 16 ways."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = next(b for b in (128, 64, 32, 16) if n % b == 0)
    tiles = (n // block_n) * triton.cdiv(m, block_m)
    split = max(1, min(16, k // group, 1400 // tiles))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split, "STAGES": 2, "num_warps": 4}


def int4_weight_only_linear(x: torch.Tensor, w: Int4Weight, path: str | None = None,
                            config: dict | None = None) -> torch.Tensor:
    """x (..., K) bf16 -> (..., N) bf16. ``path`` forces "gemv", "mm" or "dequant" (default: by M);
    ``config`` overrides the block sizes of that path."""
    k, n = w.k, w.n
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    gemv = gemv_config(n, k, w.group) if m == 1 else None
    path = path or ("gemv" if gemv else "mm" if m < DEQUANT_FROM_M else "dequant")
    if path == "dequant":
        return (x2 @ dequantize_int4(w, x.dtype)).reshape(*x.shape[:-1], n)
    if path == "gemv":
        if m != 1:
            raise ValueError("the gemv path takes one row")
        cfg = config or gemv or {"BLOCK_N": 16, "CHUNK": 1, "STAGES": 3, "num_warps": 4}
        if n % cfg["BLOCK_N"]:
            raise ValueError(f"BLOCK_N {cfg['BLOCK_N']} does not divide N = {n}")
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
        _launch(_gemv_kernel, (n // cfg["BLOCK_N"],), (x2, w.words, w.a, w.b, y, n, k), {"GROUP": w.group, **cfg})
        return y.reshape(*x.shape[:-1], n)
    cfg = config or mm_config(m, n, k, w.group)
    if n % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N {cfg['BLOCK_N']} does not divide N = {n}")
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)(m, n, device=x.device,
                                                    dtype=torch.float32 if split > 1 else x.dtype)
    grid = (n // cfg["BLOCK_N"], triton.cdiv(m, cfg["BLOCK_M"]), split)
    _launch(_mm_kernel, grid, (x2, w.words, w.a, w.b, y, m, n, k, x2.stride(0), y.stride(0)), {"GROUP": w.group, **cfg})
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
