"""W4A8 linear: int4 weights (symmetric, one float scale per group of 128 or more inputs), int8 activations
(dynamic, one scale per row), multiplied on the int8 tensor cores.

Why: from about 64 rows up a weight-only int4 linear stops being bound by reading its weights and becomes
bound by bf16 multiply-adds; int8 tensor cores do twice the work per cycle, so a W4A8 linear keeps a lead
over bf16 through the middle batch range (QServe; TensorRT-LLM's W4A8), where W4A16 falls to bf16's speed.

How the group scales are handled (as QServe's per-group variant): each step of the main loop covers one
group of 128 inputs; the int8 x int4 products of the step are summed exactly in int32 by the tensor cores,
then the sum is scaled by the group's float scale and added to a float32 accumulator (one multiply-add per
output element per 128 inputs). The row scales of x are applied once at the end.

Layout (:func:`pack_w4a8`, plain torch, testable on CPU): ``packed (N, K/2)`` int8, where byte ``64 b + j``
of a row holds the code of input ``128 b + j`` in its low nibble and that of input ``128 b + 64 + j`` in its
high nibble (two's complement). A step then unpacks two (64, BLOCK_N) tiles with shifts alone (no
interleaving) and issues two dots, against x's first and second 64 inputs of the group.

Needs K a multiple of 128 and groups that are multiples of 128.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def pack_w4a8(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes ``(N, K)`` (integers -8..7, any integer dtype) -> ``packed (N, K/2)`` int8 (module docstring)."""
    n, k = codes.shape
    if k % 128:
        raise SlimError(f"W4A8 kernel: K = {k} is not a multiple of 128")
    c = codes.to(torch.int16).reshape(n, k // 128, 2, 64)
    b = (c[:, :, 0] & 15) | ((c[:, :, 1] & 15) << 4)  # 0..255
    return torch.where(b >= 128, b - 256, b).to(torch.int8).reshape(n, k // 2)


def unpack_w4a8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_w4a8`: codes ``(N, K)`` int8 in -8..7."""
    n, half = packed.shape
    p = packed.to(torch.int16).reshape(n, half // 64, 1, 64)
    lo = ((p & 15) ^ 8) - 8
    hi = (((p >> 4) & 15) ^ 8) - 8
    return torch.cat([lo, hi], dim=2).reshape(n, half * 2).to(torch.int8)


def w4a8_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float reference: x quantized per row to int8 (symmetric, as the kernel does), times the
    dequantized int4 weight, in float32."""
    x = x.float()
    xs = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    xq = (x / xs).round().clamp(-127, 127) * xs
    codes = unpack_w4a8(packed).float()
    n, k = codes.shape
    w = (codes.reshape(n, scale.shape[1], -1) * scale.float()[..., None]).reshape(n, k)
    return xq @ w.T


def _configs():
    import triton

    out = []
    for bn, bm, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 4),
                                  (128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3),
                                  (64, 256, 4, 3)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps, num_stages=stages))
    return out


_KERNEL: list = []


def _kernel():
    """The Triton kernel, defined at first use (Triton is imported only where a GPU runs).

    The weight is the left operand of the products and x the right (y^T = W x^T, "swapped A and B"): the
    int4 codes are unpacked in registers, and Hopper's wgmma takes its left operand from registers but its
    right one only from shared memory, so the unpacked tile can feed the tensor cores without a round trip
    through shared memory; x's tile (64 inputs x BLOCK_M rows, K-major as int8 wgmma wants) is copied there
    by the pipeline. It also lets a few rows of x fill the narrow side of the instruction (8 to 256)."""
    if _KERNEL:
        return _KERNEL[0]
    import triton
    import triton.language as tl

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def w4a8_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, c_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_bs,
                    stride_cm, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m, pid_n = pid % num_m, pid // num_m  # neighbours share a weight tile (read once from HBM)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rh = tl.arange(0, 64)
        w_p = b_ptr + rn[:, None] * stride_bn + rh[None, :]  # (BLOCK_N, 64) packed bytes
        x_p = a_ptr + rm[None, :] * stride_am + rh[:, None]  # (64, BLOCK_M): x^T
        s_p = bs_ptr + rn * stride_bs
        mask_n, mask_m = rn[:, None] < N, rm[None, :] < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, 128):
            p = tl.load(w_p, mask=mask_n, other=0)
            x0 = tl.load(x_p, mask=mask_m, other=0)
            x1 = tl.load(x_p + 64, mask=mask_m, other=0)
            lo = (p << 4) >> 4  # arithmetic shifts sign-extend the nibbles
            hi = p >> 4
            part = tl.dot(lo, x0, out_dtype=tl.int32)
            part = tl.dot(hi, x1, part, out_dtype=tl.int32)  # the group's products, exact in int32
            s = tl.load(s_p + k0 // GROUP, mask=rn < N, other=0.0)
            acc += part.to(tl.float32) * s[:, None]
            w_p += 64
            x_p += 128
        sa = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
        y = acc * sa[None, :]
        tl.store(c_ptr + rm[None, :] * stride_cm + rn[:, None], y.to(c_ptr.dtype.element_ty), mask=mask_m & mask_n)

    _KERNEL.append(w4a8_kernel)
    return w4a8_kernel


def w4a8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16; packed (N, K/2) int8 (:func:`pack_w4a8`); scale (N, K/G) float32 -> (..., N) bf16.
    x is quantized per row to int8 by ``w8a8.quantize_rows`` (one read of x), then the GEMM runs."""
    m, n, k, xq, xs, y, bucket, grid = _launch_setup(x, packed, scale)
    _kernel()[grid](xq, packed, xs, scale, y, m, n, k, bucket, xq.stride(0), packed.stride(0), scale.stride(0),
                    y.stride(0), GROUP=k // scale.shape[1])
    return y.reshape(*x.shape[:-1], n)


def _launch_setup(x: torch.Tensor, packed: torch.Tensor, groups: torch.Tensor):
    """What both W4A8 GEMMs need before their launch: the shapes (checked), x's int8 rows and scales, the
    output, the autotuner's row bucket and the grid function."""
    import triton

    from slimtorch.kernels.w8a8 import quantize_rows

    k, n = x.shape[-1], packed.shape[0]
    if k != packed.shape[1] * 2 or k % 128 or (k // groups.shape[1]) % 128:
        raise SlimError(f"W4A8 kernel: x (..., {k}) against packed {tuple(packed.shape)} and scales "
                        f"{tuple(groups.shape)}: K must be 2x the packed width, a multiple of 128, and groups "
                        "multiples of 128")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    xq, xs = quantize_rows(x2, torch.int8)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bucket = 64 if m <= 64 else 128 if m <= 128 else 256 if m <= 256 else 512 if m <= 512 else 4096

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    return m, n, k, xq, xs, y, bucket, grid


# --- progressive group scales (QServe): the prototype of the next W4A8 kernel ---------------------------------

S2_MAX = 16
"""The largest integer group scale of the progressive form: codes -8..7 times 1..16 stay in int8 (-128..112)."""


def progressive_scales(scale: torch.Tensor, s2_max: int = S2_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Float group scales ``(N, G)`` -> ``(s1 (N,) float32, s2 (N, G) int8)`` with ``s1 * s2 >= scale`` and s2
    an integer in 1..``s2_max``: each group's scale rounded up to a multiple of its row's ``max / s2_max`` (up, so
    that no code of the group moves out of range).

    Why: with integer group scales, ``s2 q`` is an exact int8 weight and a whole row's products are summed in
    int32 by the tensor cores, with one float scale per row at the end, instead of a float multiply-add of the
    accumulator after every group (QServe's progressive quantization)."""
    scale = scale.float()
    s1 = (scale.amax(1) / s2_max).clamp_min(torch.finfo(torch.float32).tiny)
    s2 = torch.ceil(scale / s1[:, None] - 1e-4).clamp(1, s2_max)
    return s1, s2.to(torch.int8)


def quantize_progressive(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (codes (N, K) int8 in -8..7, s1 (N,), s2 (N, K / group) int8): symmetric int4 groups
    (scale amax / 7.5 before rounding up) with progressive scales, codes rounded to nearest against s1 s2."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    s1, s2 = progressive_scales(wg.abs().amax(-1) / 7.5)
    full = (s1[:, None] * s2.float())[..., None]
    codes = torch.round(wg / full).clamp(-8, 7).to(torch.int8).reshape(n, k)
    return codes, s1, s2


def w4a8p_linear_ref(x: torch.Tensor, packed: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The float reference of :func:`w4a8p_linear` (x quantized per row to int8 as the kernel does)."""
    return w4a8_linear_ref(x, packed, s1.float()[:, None] * s2.float())


# Two nibbles of 4 packed bytes -> 4 int8 products s2 q each, 2.3 instructions a weight: the codes go to offset
# form (q + 8, xor 8), are multiplied by s2 with one 32-bit multiply (each byte stays below 256), and 8 s2 is
# taken off each byte without borrows (a SIMD-within-a-register subtraction; the true result is in int8's
# range, so the byte's wrap-around is its two's complement). $3 holds s2 in each of its bytes.
def _nibble_times_s2(src: str, out: str) -> str:
    return f"""xor.b32 u, {src}, 0x08080808;
and.b32 u, u, 0x0F0F0F0F;
mul.lo.u32 u, u, s;
or.b32 t, u, 0x80808080;
sub.u32 t, t, ch;
xor.b32 h, u, c;
not.b32 h, h;
and.b32 h, h, 0x80808080;
xor.b32 {out}, t, h;
"""


_UNPACK_ASM = ("{\n.reg .b32 s, c, ch, u, t, h, p4;\nand.b32 s, $3, 255;\nshl.b32 c, $3, 3;\nand.b32 ch, c, 0x7F7F7F7F;\n"
               + _nibble_times_s2("$2", "$0") + "shr.u32 p4, $2, 4;\n" + _nibble_times_s2("p4", "$1") + "}")


def _p_configs():
    import triton

    out = []
    for bn, bm, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 4),
                                  (128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3),
                                  (64, 256, 4, 3), (256, 64, 8, 4)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps, num_stages=stages))
    return out


_P_KERNEL: list = []


def _p_kernel():
    """The progressive W4A8 GEMM (Triton, defined at first use): as :func:`_kernel`, with the group scale applied
    to the weight codes (exact int8) instead of to the accumulator, so one int32 accumulator runs over all of K
    and the tensor-core products of consecutive steps may overlap. ASM picks the packed unpack above."""
    if _P_KERNEL:
        return _P_KERNEL[0]
    import triton
    import triton.language as tl

    @triton.autotune(configs=_p_configs(), key=["M_BUCKET", "N", "K", "ASM"])
    @triton.jit
    def w4a8p_kernel(a_ptr, b_ptr, as_ptr, s2_ptr, s1_ptr, c_ptr, M, N, K, M_BUCKET, stride_am, stride_bn,
                     stride_s2, stride_cm, GROUP: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m, pid_n = pid % num_m, pid // num_m
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rh = tl.arange(0, 64)
        w_p = b_ptr + rn[:, None] * stride_bn + rh[None, :]
        x_p = a_ptr + rm[None, :] * stride_am + rh[:, None]
        s_p = s2_ptr + rn * stride_s2
        mask_n, mask_m = rn[:, None] < N, rm[None, :] < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        for k0 in range(0, K, 128):
            p = tl.load(w_p, mask=mask_n, other=0)
            s = tl.load(s_p + k0 // GROUP, mask=rn < N, other=0)
            sb = tl.broadcast_to(s[:, None], (BLOCK_N, 64))
            if ASM:
                lo, hi = tl.inline_asm_elementwise(_UNPACK_ASM, "=r,=r,r,r", [p, sb], dtype=(tl.int8, tl.int8),
                                                   is_pure=True, pack=4)
            else:
                lo = ((p << 4) >> 4) * sb
                hi = (p >> 4) * sb
            x0 = tl.load(x_p, mask=mask_m, other=0)
            x1 = tl.load(x_p + 64, mask=mask_m, other=0)
            acc = tl.dot(lo, x0, acc, out_dtype=tl.int32)
            acc = tl.dot(hi, x1, acc, out_dtype=tl.int32)
            w_p += 64
            x_p += 128
        sa = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
        s1 = tl.load(s1_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * s1[:, None] * sa[None, :]
        tl.store(c_ptr + rm[None, :] * stride_cm + rn[:, None], y.to(c_ptr.dtype.element_ty), mask=mask_m & mask_n)

    _P_KERNEL.append(w4a8p_kernel)
    return w4a8p_kernel


def w4a8p_linear(x: torch.Tensor, packed: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                 asm: bool = True) -> torch.Tensor:
    """x (..., K) bf16; packed (N, K/2) int8 (:func:`pack_w4a8`); s1 (N,) float32; s2 (N, K/G) int8 in
    1..16 -> (..., N) bf16. The progressive form of :func:`w4a8_linear` (prototype, benchmarks only)."""
    m, n, k, xq, xs, y, bucket, grid = _launch_setup(x, packed, s2)
    _p_kernel()[grid](xq, packed, xs, s2, s1, y, m, n, k, bucket, xq.stride(0), packed.stride(0), s2.stride(0),
                      y.stride(0), GROUP=k // s2.shape[1], ASM=asm)
    return y.reshape(*x.shape[:-1], n)
