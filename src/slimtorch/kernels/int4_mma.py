"""int4 weight-only linear on the tensor cores (CUDA C++ compiled at first use by NVRTC), for M = 1..32.

Why: the Triton GEMV spends about 3.5 instructions per weight (extract, convert, multiply-add, and
shares of the x loads), comparable to the memory time at M = 1 (benchmarks/notes/int4_kernel.md). Here
one ``lop3`` turns two codes into a bf16x2 pair ``(128 + q)``, one packed ``fma`` subtracts
``128 + zero`` exactly (codes and integer zeros are exact in bf16), and ``mma.sync m16n8k16`` does
the multiply-adds: about 1.4 instructions per weight, so the kernel is bound by memory alone. The
activation rows are the mma's N dimension (8 per tile; at M = 1 seven of the eight are wasted, which
the tensor cores can afford). Each group of 128 inputs is summed in float32 by the mma and scaled
once per group in float32, so the result is the float32 product ``sum s (q - z) x`` (more exact than
dequantizing to bf16 first).

The layout (:func:`prepare_int4_mma`, plain torch, testable on CPU) puts in each thread's 16-byte loads
exactly the codes its mma fragments need:

* ``words (N/16, K/128, 2, 2, 16, 4)`` int32: for 16 output channels (a block ``nb``) and 128 inputs (a
  unit ``u``), lane ``l = 4 g + t`` holds 8 words, ``j = 4 h + i`` at ``[nb, u, t // 2, h, 2 g + t % 2, i]``
  (each of the lane's two 16-byte loads, h = 0 and 1, reads two whole 256-byte lines with the warp; and the
  lanes with ``t // 2`` = 0 or 1, whose inputs are the first or second 64 of the unit, each have one
  contiguous 512 bytes, which the wgmma GEMM loads per half unit); word ``j`` holds the codes
  of channels ``16 nb + g`` (nibbles 0, 4, 2, 6) and ``16 nb + g + 8`` (nibbles 1, 5, 3, 7) at inputs ``128 u + 32 t + 4 j +
  {0, 1, 2, 3}`` (nibble pairs (0, 4) and (2, 6) are inputs (+0, +1) and (+2, +3)). The mma's K
  slots are permuted so that these are the inputs the lane's B fragments hold when it reads
  ``x[128 u + 32 t : 128 u + 32 t + 32]`` as four 16-byte loads.
* ``meta (N/16, K/G, 8, 4)`` int32: for lane row ``g`` the scales of channels g and g + 8 (float32
  bits) and ``-(128 + zero)`` of each as a bf16x2 pair.

Needs integer zero-points in 0..15 (what our quantizers produce), N a multiple of 16, groups of 128,
256, 512... dividing K, bf16 activations and a GPU with bf16 mma (sm_80 or newer); ``mma_supported`` says.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from slimtorch.kernels.reference import unpack_int4


@dataclass(frozen=True)
class Int4MMAWeight:
    """An int4 weight in the tensor-core kernel's layout (see the module docstring)."""

    words: torch.Tensor  # (N/16, K/128, 2, 2, 16, 4) int32
    meta: torch.Tensor  # (N/16, K/G, 8, 4) int32
    group: int

    @property
    def n(self) -> int:
        return self.words.shape[0] * 16

    @property
    def k(self) -> int:
        return self.words.shape[1] * 128

    @property
    def unit_shift(self) -> int:
        """log2(group / 128): a unit of 128 inputs belongs to group ``u >> unit_shift``."""
        return (self.group // 128).bit_length() - 1


def layout_supported(n: int, k: int, group: int, zero: torch.Tensor | None = None) -> bool:
    """Whether :func:`prepare_int4_mma` takes this weight: N a multiple of 16, groups of 128, 256, 512...
    dividing K, and zeros that are integers 0..15."""
    if n % 16 or group < 128 or group & (group - 1) or k % group:
        return False
    return zero is None or bool(((zero == zero.round()) & (zero >= 0) & (zero <= 15)).all())


def mma_supported(device: torch.device) -> bool:
    """Whether the kernel runs on this device: CUDA (not ROCm) with bf16 mma (sm_80 or newer), and NVRTC
    compiles the kernels' source there (tried once per device; a failure means the Triton kernels run)."""
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    if device.index not in _COMPILES:
        try:
            _kernel("int4_mma_dequant", device)
            _COMPILES[device.index] = True
        except Exception:  # noqa: BLE001 (no NVRTC, or a torch without _compile_kernel)
            _COMPILES[device.index] = False
    return _COMPILES[device.index]


def _bf16_bits(v: torch.Tensor) -> torch.Tensor:
    """float values (exact in bf16) -> their bf16 bits in the low half of an int32, duplicated into the high."""
    b = v.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    b = b | (b << 16)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32)


def prepare_int4_mma(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4MMAWeight:
    """The saved format (reference.py: ``packed (N, K/2)`` uint8, ``scale``/``zero`` ``(N, K/G)``) ->
    the kernel's layout (done once per layer, on the weights' device)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if scale.shape != zero.shape or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"int4 weight of shape {(n, k)} with scales {tuple(scale.shape)} and zeros "
                         f"{tuple(zero.shape)}: expected both (N, K/G)")
    group = k // scale.shape[1]
    if not layout_supported(n, k, group, zero):
        raise ValueError(f"int4 weight of shape {(n, k)}, group {group}: the tensor-core kernel needs N a multiple "
                         "of 16, groups of 128, 256, 512... that divide K, and integer zero-points 0..15")
    nb, units, groups = n // 16, k // 128, k // group
    q = unpack_int4(packed)  # (N, K) uint8
    # channel = 16 nb + 8 ro + g; input = 128 u + 32 t + 4 j + 2 kb + kl; nibble = ro + 2 kb + 4 kl
    q = q.reshape(nb, 2, 8, units, 4, 8, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1)  # nb u g t j kl kb ro
    q = q.reshape(nb, units, 32, 8, 4, 2)  # last: the two nibbles of a byte, low first
    words = (q[..., 0] | (q[..., 1] << 4)).contiguous().view(torch.int32).reshape(nb, units, 8, 2, 2, 2, 4)
    words = words.permute(0, 1, 3, 5, 2, 4, 6).reshape(nb, units, 2, 2, 16, 4).contiguous()  # nb u t//2 h 2g+t%2 i
    s = scale.float().reshape(nb, 2, 8, groups).permute(0, 3, 2, 1)  # nb grp g ro
    z = _bf16_bits(-(128 + zero.float())).reshape(nb, 2, 8, groups).permute(0, 3, 2, 1)
    meta = torch.cat([s.contiguous().view(torch.int32), z], dim=-1).contiguous()
    return Int4MMAWeight(words, meta, group)


def unpack_int4_mma(w: Int4MMAWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`prepare_int4_mma`: codes ``(N, K)`` uint8, scale and zero ``(N, K/G)``."""
    nb, units = w.words.shape[:2]
    groups = w.meta.shape[1]
    b = w.words.reshape(nb, units, 2, 2, 8, 2, 4).permute(0, 1, 4, 2, 5, 3, 6)  # nb u g t//2 t%2 h i
    b = b.contiguous().view(torch.uint8).reshape(nb, units, 32, 8, 4)
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(nb, units, 8, 4, 8, 2, 2, 2)  # nb u g t j kl kb ro
    codes = q.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(nb * 16, units * 128)
    s = w.meta[..., :2].contiguous().view(torch.float32)  # nb grp g ro
    zb = w.meta[..., 2:] & 0xFFFF
    zb = torch.where(zb >= 2**15, zb - 2**16, zb).to(torch.int16).view(torch.bfloat16).float()
    scale = s.permute(0, 3, 2, 1).reshape(nb * 16, groups)
    zero = (-zb - 128).permute(0, 3, 2, 1).reshape(nb * 16, groups)
    return codes, scale, zero


# Device helpers shared with the wgmma GEMM (int4_gemm.py)
_PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) U4 { u32 v[4]; };

__device__ __forceinline__ U4 ld_stream(const U4* p) {  // read once: do not keep in L1
  U4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "l"(p));
  return r;
}
__device__ __forceinline__ U4 ld_keep(const U4* p) {
  U4 r;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 codes_bf16x2(u32 w) {  // (w & 0x000F000F) | 0x43004300: bf16 pair 128 + q
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x43004300));
  return r;
}
__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ float as_float(u32 u) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
  return f;
}
__device__ __forceinline__ u16 to_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
__device__ __forceinline__ void cluster_sync() {  // every thread of every block of the cluster (sm_90)
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Programmatic dependent launch (sm_90): launched with that attribute, a kernel may start while the previous
// one on its stream finishes; it may load what no kernel writes (weights) first, then waits for the previous
// kernel before reading x or writing anything. Without the attribute both are no-ops.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
"""

_SOURCE = _PRELUDE + r"""
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A lane's 32 bytes of the weights of channel block nb, unit u: two 16-byte loads (words 4 h + i at
// [t / 2, h, 2 g + t % 2, i]), each of which the warp reads as two whole 256-byte lines.
__device__ __forceinline__ void load_unit(const U4* __restrict__ wq, long long nb, int units, int u, int lane,
                                          U4 (&out)[2]) {
  const U4* p = wq + (nb * units + u) * 64 + ((lane & 2) << 4) + ((lane >> 1) & ~1) + (lane & 1);
  out[0] = ld_stream(p);
  out[1] = ld_stream(p + 16);
}

__device__ __forceinline__ float ld_peer(u32 local, u32 rank) {  // a float in cluster block `rank`'s shared memory
  u32 remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

// Output i of a block's NB x MT x 128 sums (the mma's C fragments: c0, c1 at row g, columns 2t and 2t + 1; c2, c3
// at row g + 8) into y, unless its row of x is past M.
template <int MT>
__device__ __forceinline__ void store_sum(u16* __restrict__ y, int i, float s, int nb0, int M, int sy) {
  const int ln = i & 31, r = (i >> 5) & 3, nm = i >> 7, mt = nm % MT, nb = nm / MT;
  const int row = (nb0 + nb) * 16 + (ln >> 2) + ((r & 2) << 2);
  const int tok = mt * 8 + 2 * (ln & 3) + (r & 1);
  if (tok < M) y[(long long)tok * sy + row] = to_bf16(s);
}

// y (M, N) = x (M, K) @ w^T. Block: NB blocks of 16 channels and 1/KS of the units of K (a cluster of KS blocks
// along y covers all of K, their sums added through distributed shared memory); warp w takes units
// begin + w, begin + w + WARPS, ... MT tiles of 8 rows of x (M <= 8 MT). PF 1: load the next unit's weights
// before this unit's arithmetic; PF 2: load only the first unit's early, before waiting for the previous kernel.
// EARLY: let the next kernel (a programmatic dependent launch) start before this one waits for the previous one,
// so that its first weight loads overlap this kernel's; else only once this kernel's loop is done.
template <int NB, int MT, int WARPS, int PF, int EARLY, int KS>
__device__ __forceinline__ void int4_mma_body(
    const U4* __restrict__ wq, const U4* __restrict__ meta, const u16* __restrict__ x, u16* __restrict__ y,
    int M, int units, int groups, int unit_shift, int sx, int sy) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nb0 = blockIdx.x * NB;
  const int ks = KS > 1 ? blockIdx.y : 0;
  const int u_begin = (int)(((long long)units * ks) / KS), u_end = (int)(((long long)units * (ks + 1)) / KS);
  const u32 one = 0x3F803F80u;
  float acc[NB][MT][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nb][mt][r] = 0.f;
  const u16* xr[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    int tok = mt * 8 + g;
    tok = tok < M ? tok : M - 1;  // rows past M read row M - 1; their outputs are not stored
    xr[mt] = x + (long long)tok * sx + 32 * t;
  }
  U4 wn[NB][2];  // PF 1: the next unit's weights, loaded a unit ahead; PF 2: only the first unit's, loaded early
  if (PF && u_begin + warp < u_end) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) load_unit(wq, nb0 + nb, units, u_begin + warp, lane, wn[nb]);
  }
  if (EARLY) launch_dependents();  // the next kernel still waits for this one's end before it reads its x
  grid_dependency_wait();  // x may be the previous kernel's output: read it only after that kernel is done
  for (int u = u_begin + warp; u < u_end; u += WARPS) {
    U4 wv[NB][2], mv[NB], xv[MT][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      if (PF == 1 || (PF == 2 && u == u_begin + warp)) {
        wv[nb][0] = wn[nb][0];
        wv[nb][1] = wn[nb][1];
      } else {
        load_unit(wq, nb0 + nb, units, u, lane, wv[nb]);
      }
      mv[nb] = ld_keep(meta + ((long long)(nb0 + nb) * groups + (u >> unit_shift)) * 8 + g);
    }
    if (PF == 1 && u + WARPS < u_end) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) load_unit(wq, nb0 + nb, units, u + WARPS, lane, wn[nb]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[mt][q] = ld_keep(reinterpret_cast<const U4*>(xr[mt] + u * 128) + q);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      float c[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) c[mt][r] = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const u32 w = wv[nb][j >> 2].v[j & 3];
        const u32 a0 = fma_bf16x2(codes_bf16x2(w), one, mv[nb].v[2]);
        const u32 a1 = fma_bf16x2(codes_bf16x2(w >> 4), one, mv[nb].v[3]);
        const u32 a2 = fma_bf16x2(codes_bf16x2(w >> 8), one, mv[nb].v[2]);
        const u32 a3 = fma_bf16x2(codes_bf16x2(w >> 12), one, mv[nb].v[3]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          mma(c[mt], a0, a1, a2, a3, xv[mt][j >> 1].v[(2 * j) & 3], xv[mt][j >> 1].v[(2 * j + 1) & 3]);
      }
      const float s0 = as_float(mv[nb].v[0]), s1 = as_float(mv[nb].v[1]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[nb][mt][0] += s0 * c[mt][0];
        acc[nb][mt][1] += s0 * c[mt][1];
        acc[nb][mt][2] += s1 * c[mt][2];
        acc[nb][mt][3] += s1 * c[mt][3];
      }
    }
  }
  if (!EARLY) launch_dependents();
  __shared__ float red[WARPS * NB * MT * 128];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[((warp * NB + nb) * MT + mt) * 128 + r * 32 + lane] = acc[nb][mt][r];
  __syncthreads();
  for (int i = threadIdx.x; i < NB * MT * 128; i += WARPS * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w * NB * MT * 128 + i];
    if (KS > 1) {
      red[i] = s;  // slot i of warp 0 was read only by this thread
    } else {
      store_sum<MT>(y, i, s, nb0, M, sy);
    }
  }
  if (KS > 1) {
    cluster_sync();  // every block's sums are in its red[0 .. NB*MT*128)
    const int per = (NB * MT * 128 + KS - 1) / KS;  // each block of the cluster writes a share of the outputs
    for (int i = ks * per + threadIdx.x; i < min((ks + 1) * per, NB * MT * 128); i += WARPS * 32) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < KS; ++r) s += ld_peer(smem_addr(red + i), r);
      store_sum<MT>(y, i, s, nb0, M, sy);
    }
    cluster_sync();  // no block leaves while others may still read its shared memory
  }
}

template <int NB, int MT, int WARPS, int PF, int EARLY>
__global__ void __launch_bounds__(WARPS * 32) int4_mma(
    const U4* __restrict__ wq, const U4* __restrict__ meta, const u16* __restrict__ x, u16* __restrict__ y,
    int M, int units, int groups, int unit_shift, int sx, int sy) {
  int4_mma_body<NB, MT, WARPS, PF, EARLY, 1>(wq, meta, x, y, M, units, groups, unit_shift, sx, sy);
}

#if __CUDA_ARCH__ >= 900  // clusters are Hopper's
template <int NB, int MT, int WARPS, int PF, int EARLY, int KS>
__global__ void __cluster_dims__(1, KS, 1) __launch_bounds__(WARPS * 32) int4_mma_split(
    const U4* __restrict__ wq, const U4* __restrict__ meta, const u16* __restrict__ x, u16* __restrict__ y,
    int M, int units, int groups, int unit_shift, int sx, int sy) {
  int4_mma_body<NB, MT, WARPS, PF, EARLY, KS>(wq, meta, x, y, M, units, groups, unit_shift, sx, sy);
}
#endif

// out (N, K) bf16 = the dequantized weight, s (q - z) rounded once. One warp per (16 channels, 128 inputs);
// the tile goes through shared memory so that each store writes whole 256-byte rows.
__global__ void __launch_bounds__(128) int4_mma_dequant(
    const U4* __restrict__ wq, const U4* __restrict__ meta, u16* __restrict__ out, int units, int groups,
    int unit_shift, int K) {
  __shared__ U4 tile[4][16][16];  // per warp: 16 rows x 128 bf16
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int u = blockIdx.x * 4 + warp, nb = blockIdx.y;
  if (u >= units) return;
  U4 wv[2];
  load_unit(wq, nb, units, u, lane, wv);
  const U4 mv = ld_keep(meta + ((long long)nb * groups + (u >> unit_shift)) * 8 + g);
  const float s[2] = {as_float(mv.v[0]), as_float(mv.v[1])};
  const float z[2] = {-as_float(mv.v[2] << 16) - 128.f, -as_float(mv.v[3] << 16) - 128.f};
  U4 o[2][4];  // o[ro]: 32 bf16 of channel 16 nb + g + 8 ro at inputs 128 u + 32 t + (0..31)
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const u32 w = wv[j >> 2].v[j & 3];
#pragma unroll
    for (int ro = 0; ro < 2; ++ro)
#pragma unroll
      for (int kb = 0; kb < 2; ++kb) {  // inputs 4 j + 2 kb + (0, 1): nibbles ro + 2 kb and ro + 2 kb + 4
        const int n0 = ro + 2 * kb;
        const float lo = s[ro] * ((float)((w >> (4 * n0)) & 15u) - z[ro]);
        const float hi = s[ro] * ((float)((w >> (4 * n0 + 16)) & 15u) - z[ro]);
        const int e = 2 * j + kb;  // which 32-bit pair of the 16
        o[ro][e >> 2].v[e & 3] = (u32)to_bf16(lo) | ((u32)to_bf16(hi) << 16);
      }
  }
#pragma unroll
  for (int ro = 0; ro < 2; ++ro)
#pragma unroll
    for (int q = 0; q < 4; ++q) tile[warp][g + 8 * ro][4 * t + q] = o[ro][q];
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int c = it * 32 + lane, row = c >> 4, col = c & 15;
    *reinterpret_cast<U4*>(out + ((long long)nb * 16 + row) * K + (long long)u * 128 + 8 * col) = tile[warp][row][col];
  }
}
"""

_COMPILED: dict = {}  # (kernel name, device index) -> torch's compiled-kernel object
_COMPILES: dict = {}  # device index -> whether NVRTC compiled the source there
_DRIVER: list = []  # the CUDA driver library (ctypes), loaded once


def _driver():
    """The CUDA driver library through ctypes (also used by int4_gemm.py)."""
    if not _DRIVER:
        from torch.cuda._utils import _get_gpu_runtime_library

        _DRIVER.append(_get_gpu_runtime_library())
    return _DRIVER[0]


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PDL = _LaunchAttr(6, b"", (ctypes.c_int * 16)(1))  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 1


def _kernel(name: str, device: torch.device):
    key = (name, device.index)
    kern = _COMPILED.get(key)
    if kern is None:
        with torch.cuda.device(device):
            kern = _COMPILED[key] = torch.cuda._compile_kernel(_SOURCE, name)
    return kern


class _Plan:
    """The ctypes objects of one launch shape, made once; a call only refreshes the argument values."""

    def __init__(self, kern, grid: tuple, block: int, kinds: tuple, pdl: bool) -> None:
        self.func = kern.func
        self.vals = [ctypes.c_void_p() if kind else ctypes.c_int() for kind in kinds]
        self.ptrs = (ctypes.c_void_p * len(kinds))(*map(ctypes.addressof, self.vals))
        self.cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(block, 1, 1), 0, None,
                                 ctypes.pointer(_PDL) if pdl else None, 1 if pdl else 0)
        self.cfg_ref = ctypes.byref(self.cfg)


_PLANS: dict = {}


def _launch(name: str, grid: tuple, block: int, args: tuple, device: torch.device, pdl: bool = False) -> None:
    """cuLaunchKernelEx on the current stream (captured by CUDA graphs like any launch), optionally as a
    programmatic dependent launch. Kept lean (at M = 1 the kernel takes about 10 us): the ctypes objects of
    each launch shape are made once per thread."""
    kinds = tuple(isinstance(a, torch.Tensor) for a in args)
    key = (name, device.index, grid, block, pdl, kinds, threading.get_ident())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(_kernel(name, device), grid, block, kinds, pdl)
    for v, a, kind in zip(plan.vals, args, kinds):
        v.value = a.data_ptr() if kind else a
    plan.cfg.stream = torch._C._cuda_getCurrentRawStream(device.index)
    err = _driver().cuLaunchKernelEx(plan.cfg_ref, plan.func, plan.ptrs, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx({name}) failed with CUDA error {err}")


MAX_M = 32  # the most rows the tensor-core kernel takes (4 tiles of 8); more go to dequantize + cuBLAS

# Measured best on an H100 where the rule in mma_config was more than 5% slower
# (benchmarks/results/int4_mma_sweep.jsonl): (MT, N, K) -> config.
_TUNED = {
    (1, 11008, 4096): {"NB": 2, "WARPS": 8, "PF": 0, "KS": 1, "EARLY": False},
    (1, 12288, 4096): {"NB": 2, "WARPS": 8, "PF": 0, "KS": 1, "EARLY": False},  # a 7B model's fused q/k/v
    (1, 22016, 4096): {"NB": 1, "WARPS": 2, "PF": 1, "KS": 1, "EARLY": False},  # and gate/up projections
    (1, 13824, 5120): {"NB": 1, "WARPS": 5, "PF": 1, "KS": 1},
    (2, 4096, 11008): {"NB": 2, "WARPS": 8, "PF": 1, "KS": 2},
    (4, 4096, 11008): {"NB": 2, "WARPS": 4, "PF": 1, "KS": 2},
}


_CONFIGS: dict = {}


def mma_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Block shape of the tensor-core kernel: NB blocks of 16 channels per program, MT tiles of 8 rows, WARPS,
    PF (1: prefetch the next unit; 2: only the first), KS (K split over a cluster of KS programs; sm_90 only), PDL
    (programmatic dependent launch; sm_90 only) and EARLY (with PDL: the next kernel may start, and load its first
    weights, before this one has read x; else once this one's loop is done).

    The rule (from the H100 sweep): as many warps as fit the chip in one wave (about 32, 20 and 10 per
    multiprocessor at 1, 2 and 4 tiles: registers limit it), so every weight load is issued at once."""
    mt = 1 << max(0, (m - 1).bit_length() - 3)  # 1, 2 or 4 tiles of 8 rows
    key = (mt, n, k, device.index)
    cfg = _CONFIGS.get(key)
    if cfg is not None:
        return cfg
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    pdl = hopper and mt < 4  # at 4 tiles PDL cost 25% at one shape (8192 x 8192: 34 vs 27 us)
    # at one row, starting the next call early saved 5-15% at 4 of 7 shapes and cost 1-15% at the 3 that _TUNED
    # marks; at 16 rows it cost up to 20% (int4_mma_sweep.jsonl, --near-default)
    early = pdl and mt == 1
    tuned = _TUNED.get((mt, n, k))
    if tuned is not None and (hopper or tuned["KS"] == 1):
        cfg = {"MT": mt, "EARLY": early, **tuned, "PDL": pdl}  # _TUNED only turns EARLY off
    else:
        nb = 1 if mt == 1 or (n // 16) % 2 else 2
        cap = {1: 32, 2: 20, 4: 10}[mt] * torch.cuda.get_device_properties(device).multi_processor_count
        blocks = n // (16 * nb)
        warps = next((w for w in (16, 8) if blocks * w <= cap and w * nb * mt * 512 <= 48 * 1024), 4)
        cfg = {"NB": nb, "MT": mt, "WARPS": warps, "PF": 1, "KS": 1, "PDL": pdl, "EARLY": early}
    _CONFIGS[key] = cfg
    return cfg


def int4_mma_linear(x: torch.Tensor, w: Int4MMAWeight, config: dict | None = None) -> torch.Tensor:
    """x (..., K) bf16 with at most :data:`MAX_M` rows -> (..., N) bf16, on the tensor cores."""
    k, n = w.k, w.n
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"int4_mma_linear takes bf16 x (..., {k}); got {x.dtype} {tuple(x.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or mma_config(m, n, k, x.device)
    nb, mt, ks = cfg["NB"], cfg["MT"], cfg.get("KS", 1)
    if not 0 < m <= 8 * mt or mt > MAX_M // 8:
        raise ValueError(f"{m} rows with MT = {mt}: the tensor-core kernel takes 1..{8 * min(mt, MAX_M // 8)} rows")
    if (n // 16) % nb or cfg["WARPS"] * nb * mt * 512 > 48 * 1024:
        raise ValueError(f"config {cfg} does not fit N = {n} (N/16 a multiple of NB) or 48 KB of shared memory")
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    tpl = f"{nb}, {mt}, {cfg['WARPS']}, {cfg['PF']}, {int(cfg.get('EARLY', 0))}"
    name = f"int4_mma<{tpl}>" if ks == 1 else f"int4_mma_split<{tpl}, {ks}>"
    args = (w.words, w.meta, x2, y, m, k // 128, w.meta.shape[1], w.unit_shift, x2.stride(0), n)
    _launch(name, (n // (16 * nb), ks, 1), 32 * cfg["WARPS"], args, x.device, cfg.get("PDL", False))
    return y.reshape(*x.shape[:-1], n)


def dequantize_int4_mma(w: Int4MMAWeight) -> torch.Tensor:
    """The weight ``(N, K)`` in bf16 (``F.linear(x, result)`` is the linear)."""
    out = torch.empty(w.n, w.k, device=w.words.device, dtype=torch.bfloat16)
    units = w.k // 128
    args = (w.words, w.meta, out, units, w.meta.shape[1], w.unit_shift, w.k)
    _launch("int4_mma_dequant", (-(-units // 4), w.n // 16, 1), 128, args, out.device)
    return out


def int4_linear(x: torch.Tensor, w: Int4MMAWeight) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype. For bf16 x: up to :data:`MAX_M` rows, the tensor-core kernel here;
    more rows on Hopper, the wgmma GEMM that reads the same layout (:mod:`slimtorch.kernels.int4_gemm`; as fast
    as dequantize + cuBLAS or faster at M = 4096 and 8192 but for one shape 2% behind, int4_gemm_sweep.jsonl).
    Otherwise the weight is dequantized to bf16 once and cuBLAS multiplies (compute-bound there)."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dtype == torch.bfloat16 and 0 < m <= MAX_M:
        return int4_mma_linear(x, w)
    if x.dtype == torch.bfloat16 and m > 0:
        from slimtorch.kernels import int4_gemm

        if int4_gemm.gemm_supported(x.device, w):
            return int4_gemm.int4_gemm(x, w)
    return torch.nn.functional.linear(x, dequantize_int4_mma(w).to(x.dtype))
