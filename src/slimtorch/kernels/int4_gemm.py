"""int4 weight-only GEMM for many activation rows (prefill), on Hopper's warpgroup tensor cores (wgmma).

Why: dequantizing the weight to bf16 and calling cuBLAS writes and reads the whole bf16 weight once
more, and needs room for it; at M = 2048 that cost 6-20% against bf16 (benchmarks/notes/int4_kernel.md).
Here the weights go from their int4 words straight into the registers that are wgmma's A operand, so
nothing bigger than the int4 weight is ever read.

It reads the same layout as the small-M kernel (:mod:`slimtorch.kernels.int4_mma`), whose K slots are
permuted for that kernel. A wgmma step reads its 16 inputs of x in order from shared memory, so each
lane gathers, for its fragment of step ``j`` (inputs ``16 j + 2 t + {0, 1, 8, 9}`` of a unit of 128),
two words written for lane ``(g, j // 2)`` and picks four bytes of them with one ``prmt``: the codes
of inputs ``16 j + 2 t`` and ``+ 1`` (channels g and g + 8) are bytes ``t % 2`` and ``2 + t % 2`` of word
``4 (j % 2) + t // 2``, those of ``+ 8`` and ``+ 9`` the same bytes of the word two further on.

A tile is 128 output channels x NT activation rows (NT is the wgmma's N: 64-256, by default 256). A block has
three warpgroups: a producer, whose one thread issues the tensor memory accelerator's copies, and two
consumers of 64 channels each (``setmaxnreg`` moves the producer's registers to them). Blocks run in
clusters of two along the channels, which share x: each loads half the rows and multicasts them to both.
Each stage brings 64 inputs x NT rows of x (128-byte swizzle), half a unit's words of the block's
channels (4 KB, contiguous per 16 channels) and, every other stage, their scales/zeros into a ring of
shared-memory slots guarded by mbarriers; a slot is released to both blocks' producers once its wgmmas
are done. One stage's wgmmas run while the next stage is decoded into the next of three sets of A
registers, so the consumers hold only two slots and the producer runs two stages ahead in a ring of 4.
Weights are scaled in bf16 (``s (q - z)`` rounded once, as the dequantize path does), and the products
are summed in float32. The blocks are persistent: each walks its pieces of work (:func:`schedule`,
mirrored by :func:`pieces`), the producer running ahead into the next piece while the consumers store
the last through shared memory (``stmatrix``) and a TMA store. A last round of tiles at most half full is
cut over K ("stream-K"): float32 partial sums, added up by the last part to finish. It is launched as a
programmatic dependent launch: set up while the previous kernel on the stream ends, it waits for that
kernel before its first load.

Measured on an H100 (benchmarks/results/kernels.jsonl, CUDA graphs; medians of 5 timings in turn with bf16
at 23c0ae0): 1.00-1.07x bf16 at M = 2048 and 1.02-1.06x at M = 8192; 0.73-1.50x at M = 128 (f35c6a1).
Held at the power limit (int4_gemm_sustained.jsonl), 1.01-1.06x.

Needs sm_90 (wgmma, TMA, clusters), the layout's conditions and N a multiple of 128 (clusters of two where
N is a multiple of 256), bf16 x whose row stride is a multiple of 8 elements.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from slimtorch.kernels.int4_mma import _PDL, _PRELUDE, Int4MMAWeight, _driver, _LaunchAttr, _LaunchConfig


def _wgmma_asm(nt: int) -> str:
    """The inline-asm wgmma m64n{nt}k16 with A from registers: nt / 2 float accumulators, then a0..a3 and B's
    descriptor."""
    nd = nt // 2
    regs = ", ".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    return (
        f"template <> __device__ __forceinline__ void wgmma<{nt}>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc) {{\n"
        f'  asm volatile("wgmma.mma_async.sync.aligned.m64n{nt}k16.f32.bf16.bf16 {{{regs}}}, '
        f'{{%{nd},%{nd + 1},%{nd + 2},%{nd + 3}}}, %{nd + 4}, 1, 1, 1, 0;"\n'
        f'    : {outs}\n'
        f'    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));\n'
        "}\n")


_SOURCE = _PRELUDE + r"""
typedef unsigned long long u64;
struct alignas(64) TMap { u64 v[16]; };

__device__ __forceinline__ void bar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_expect(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
  u32 done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
// s (q - z) for a pair: (128 + q) - (128 + z) is exact in bf16, then one rounding of the product with s
__device__ __forceinline__ u32 dequant_bf16x2(u32 codes, u32 zz, u32 ss) {
  return fma_bf16x2(fma_bf16x2(codes_bf16x2(codes), 0x3F803F80u, zz), ss, 0x80008000u);
}
__device__ __forceinline__ u32 bf16x2_of(u32 float_bits) {  // a float32 rounded to bf16, in both halves
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "r"(float_bits));
  return r;
}
// wgmma's descriptor of a K-major tile in shared memory with the 128-byte swizzle: rows of 128 bytes,
// 8-row atoms 1024 bytes apart
__device__ __forceinline__ u64 smem_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)64 << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}
template <int NT> __device__ __forceinline__ void wgmma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc);
@WGMMA@
template <int ND> __device__ __forceinline__ void fence_operands(float* d) {
#pragma unroll
  for (int i = 0; i < ND; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

template <int D>  // a 2-D or 3-D box of a TMA descriptor into shared memory, completing bytes on the mbarrier
__device__ __forceinline__ void tma_load_nd(u32 dst, const TMap* map, u32 bar, int c0, int c1, int c2) {
  if (D == 2)
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar) : "memory");
  else
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
                 :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
}
__device__ __forceinline__ U4 lds4(u32 addr) {
  U4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "r"(addr));
  return r;
}

template <int CL>  // x's rows for this block of the cluster, multicast to the shared memory of all CL blocks
__device__ __forceinline__ void tma_load_x(u32 dst, const TMap* map, u32 bar, int c0, int c1) {
  if (CL == 1)
    tma_load_nd<2>(dst, map, bar, c0, c1, 0);
  else
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3}], [%4], %5;"
                 :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar), "h"((unsigned short)((1 << CL) - 1)) : "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
template <int CL>  // arrive on the mbarrier at `bar` of block `rank` of the cluster
__device__ __forceinline__ void bar_arrive_in(u32 bar, u32 rank) {
  if (CL == 1) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
  } else {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(rank));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(remote) : "memory");
  }
}
__device__ __forceinline__ void warpgroup_sync(int wg) {  // consumer warpgroup wg's 128 threads
  asm volatile("bar.sync %0, 128;" :: "r"(2 + wg) : "memory");
}
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// four 8 x 8 bf16 matrices from their mma-style fragments, transposed, to the rows whose addresses lanes 8 i..8 i + 7
// give for matrix i
__device__ __forceinline__ void stmatrix_x4_trans(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
               :: "r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
__device__ __forceinline__ void tma_store_2d(const TMap* map, u32 src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];"
               :: "l"((u64)map), "r"(c0), "r"(c1), "r"(src) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
__device__ __forceinline__ void consumer_sync() {  // the two consumer warpgroups only (the producer has left)
  asm volatile("bar.sync 1, 256;" ::: "memory");
}

// The schedule, mirrored by `pieces` in Python, is in clusters of CL blocks and tiles of CL x 128 channels x NT
// rows (block `rank` of a cluster computes the tile's channels 128 rank..). Tiles are numbered with the channels
// fastest, so that neighbouring clusters share their rows of x. Cluster c first computes the whole tiles c,
// c + clusters, ... below `whole`; then, if c < sk, its share [e_c, e_c+1) of the other `tail` tiles' units
// (e_c = W c / sk, W = tail x units), cut at tile boundaries ("stream-K"). A piece short of a whole tile is a
// part: each block writes its float32 partial sums to slot 2 b (the first piece of its cluster's share) or
// 2 b + 1 (the last), b = CL c + rank, and the last of the tile's parts to finish adds them up and stores.
struct Work {
  int nb0, m0, u0, u1, tt, parts, slot, valid;  // tt: the tail tile of a part (-1 for a whole tile)
};
__device__ __forceinline__ int sk_owner(long long x, int sk, long long W) {  // the block whose share holds unit x
  return (int)((sk * (x + 1) - 1) / W);
}
__device__ __forceinline__ int sk_first_tile(int b, int sk, long long W, int units) { return (int)(W * b / sk / units); }
__device__ __forceinline__ Work piece(int k, int b, int grid, int tiles_n, int units, int whole, int tail, int sk,
                                      int NT, int CL, int rank, int rows, int band) {
  Work r;
  r.tt = -1;
  r.parts = 1;
  r.slot = 0;
  r.valid = 1;
  r.u0 = 0;
  r.u1 = units;
  int tile;
  const int ndp = b < whole ? (whole - 1 - b) / grid + 1 : 0;
  if (k < ndp) {
    tile = b + k * grid;
  } else if (b < sk) {
    const long long W = (long long)tail * units, e0 = W * b / sk, e1 = W * (b + 1) / sk;
    const int t0 = sk_first_tile(b, sk, W, units), tt = t0 + (k - ndp);
    const long long base = (long long)tt * units;
    const long long x0 = e0 > base ? e0 : base, x1 = e1 < base + units ? e1 : base + units;
    r.valid = x0 < x1;
    r.u0 = (int)(x0 - base);
    r.u1 = (int)(x1 - base);
    tile = whole + tt;
    if (r.u1 - r.u0 < units) {
      r.tt = tt;
      r.parts = sk_owner(base + units - 1, sk, W) - sk_owner(base, sk, W) + 1;
      r.slot = 2 * (CL * b + rank) + (tt != t0);
    }
  } else {
    r.valid = 0;
    tile = 0;
  }
  // tile -> (row tile, channel tile): bands of `band` row tiles, row tiles fastest within a band
  const int per = band * tiles_n, q = tile / per, in = tile - q * per, nr = min(band, rows - q * band);
  r.nb0 = ((in / nr) * CL + rank) * 8;
  r.m0 = (q * band + in % nr) * NT;
  return r;
}

// y (M, N) = x (M, K) @ w^T in tiles of 128 channels x NT rows of x. Warpgroup 0 is the producer: its thread 0
// walks the block's pieces and, for each stage i (unit u = i / 2, half i % 2), brings into ring slot (stage count)
// % STAGES, through the tensor memory accelerator: x's rows x inputs 64 i + (0..63) (128-byte swizzle; in a
// cluster each block loads NT / CL of the rows for all CL blocks), words[nb, u, i % 2] of the tile's 8 blocks of
// 16 channels (512 bytes each), and on even stages their scales/zeros (odd stages read the even stage's slot,
// which is released only after them). Consumer warpgroup c (1 + c) computes channels 64 c.. of the tile, warp w
// of the 8 consumer warps 16. Stage i's weights are decoded into the next of three sets of A registers while
// stage i - 1's wgmmas run; once those are done (wgmma_wait<1> after stage i is issued) its slot is released (one
// arrival per consumer warp of every block of the cluster, since every block's producer writes into it). The producer runs ahead into the
// next piece while the consumers store the last (stmatrix into the output tile, then a TMA store per warpgroup).
// Registers: the producer gives its back (setmaxnreg) to the consumers.
template <int NT, int STAGES, int CL>
__global__ void __launch_bounds__(384, 1) int4_wgmma(
    const __grid_constant__ TMap xmap, const __grid_constant__ TMap wmap, const __grid_constant__ TMap mmap,
    const __grid_constant__ TMap ymap, float4* __restrict__ part_sums, int* __restrict__ counters,
    int M, int units, int unit_shift, int tiles_n, int whole, int tail, int sk, int band) {
  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr u32 TILE = NT * 128, WB = 4096, MB = 1024;  // bytes per slot: x, words, meta (even stages only)
  const u32 xs = (smem_addr(smem) + 1023) & ~1023u, ws = xs + STAGES * TILE, ms = ws + STAGES * WB;
  const u32 ys = ms + STAGES * MB;  // the output tile, 64 channels x NT rows per warpgroup (128-byte swizzle)
  const u32 full = ys + 2 * TILE, empty = full + STAGES * 8;  // mbarriers
  __shared__ int last_part;
  const int tid = threadIdx.x, rank = CL > 1 ? (int)cluster_rank() : 0, b = blockIdx.x / CL, grid = gridDim.x / CL;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bar_init(full + 8 * s, 1);
      bar_init(empty + 8 * s, 8 * CL);  // one arrival per consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (CL > 1) cluster_sync();  // the other blocks' barriers are ready for multicasts and arrivals
  launch_dependents();  // launched as a programmatic dependent launch, the next kernel may be set up now
  if (tid < 128) {  // the producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (tid == 0) {
      // x may be the previous kernel's output, and y its input: every load (and so every store, which follows
      // from the loads through the mbarriers) waits for that kernel's end
      grid_dependency_wait();
      int it = 0;
      for (int k = 0;; ++k) {
        const Work wk = piece(k, b, grid, tiles_n, units, whole, tail, sk, NT, CL, rank, (M + NT - 1) / NT, band);
        if (!wk.valid) break;
        for (int s = 2 * wk.u0; s < 2 * wk.u1; ++s, ++it) {
          const int slot = it % STAGES;
          if (it >= STAGES) bar_wait(empty + 8 * slot, (it / STAGES + 1) & 1);
          const u32 bar = full + 8 * slot;
          bar_expect(bar, TILE + WB + (s & 1 ? 0 : MB));
          tma_load_x<CL>(xs + slot * TILE + rank * (TILE / CL), &xmap, bar, 64 * s, wk.m0 + rank * (NT / CL));
          tma_load_nd<2>(ws + slot * WB, &wmap, bar, 128 * s, wk.nb0, 0);
          if (!(s & 1)) tma_load_nd<3>(ms + slot * MB, &mmap, bar, 0, (s >> 1) >> unit_shift, wk.nb0);
        }
      }
    }
  } else {  // the consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    const int ct = tid - 128, lane = ct & 31, warp = ct >> 5, g = lane >> 2, t = lane & 3;
    const u32 sel = (t & 1) ? 0x7351u : 0x6240u;
    const u32 wlane = warp * 512 + g * 32, mlane = warp * 128 + g * 16;
    const bool odd = t >> 1;  // words t / 2 and t / 2 + 2 of each 16 bytes read
    float acc[NT / 2];
    u32 a0[4][4], a1[4][4], a2[4][4];
    int it0 = 0;  // stages consumed before this piece
    for (int k = 0;; ++k) {
      const Work wk = piece(k, b, grid, tiles_n, units, whole, tail, sk, NT, CL, rank, (M + NT - 1) / NT, band);
      if (!wk.valid) break;
      const int ns = 2 * (wk.u1 - wk.u0);
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;
      auto step = [&](int i, u32 (&a)[4][4]) {
        const int it = it0 + i, slot = it % STAGES;
        bar_wait(full + 8 * slot, (it / STAGES) & 1);
        const U4 mv = lds4(ms + ((it - (i & 1)) % STAGES) * MB + mlane);  // an odd stage: the even one's slot
        const u32 sc0 = bf16x2_of(mv.v[0]), sc1 = bf16x2_of(mv.v[1]);
        // step jj (inputs 64 h + 16 jj ...): words 4 (jj % 2) + t / 2 and that + 2 of lane (g, 2 h + jj / 2), whose
        // 16 bytes are at [jj % 2, 2 g + jj / 2] of the warp's 512 (words[nb, u, h])
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const U4 v = lds4(ws + slot * WB + wlane + (jj & 1) * 256 + (jj >> 1) * 16);
          const u32 n = prmt(odd ? v.v[1] : v.v[0], odd ? v.v[3] : v.v[2], sel);
          a[jj][0] = dequant_bf16x2(n, mv.v[2], sc0);
          a[jj][1] = dequant_bf16x2(n >> 4, mv.v[3], sc1);
          a[jj][2] = dequant_bf16x2(n >> 8, mv.v[2], sc0);
          a[jj][3] = dequant_bf16x2(n >> 12, mv.v[3], sc1);
        }
        fence_operands<NT / 2>(acc);
        wgmma_fence();
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          wgmma<NT>(acc, a[jj][0], a[jj][1], a[jj][2], a[jj][3], smem_desc(xs + slot * TILE + 32 * jj));
        wgmma_commit();
        wgmma_wait<1>();  // stage i - 1 is done: its slot may be refilled, its A registers rewritten
        fence_operands<NT / 2>(acc);
        if (i >= 1 && lane < CL) bar_arrive_in<CL>(empty + 8 * ((it - 1) % STAGES), lane);
      };
      int i = 0;
      for (; i + 2 < ns; i += 3) {  // no conditional steps inside: ptxas then keeps the wgmmas asynchronous
        step(i, a0);
        step(i + 1, a1);
        step(i + 2, a2);
      }
      if (i < ns) step(i, a0);
      if (i + 1 < ns) step(i + 1, a1);
      wgmma_wait<0>();
      fence_operands<NT / 2>(acc);
      if (lane < CL) bar_arrive_in<CL>(empty + 8 * ((it0 + ns - 1) % STAGES), lane);
      it0 += ns;

      bool store = true;
      if (wk.tt >= 0) {  // a part: add up with the tile's other parts; the last one to finish stores
        float4* mine = part_sums + (long long)wk.slot * (NT * 32);
#pragma unroll
        for (int i = 0; i < NT / 8; ++i) mine[i * 256 + ct] = make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
        __threadfence();
        consumer_sync();
        if (ct == 0) {
          const int done = atomicAdd(counters + CL * wk.tt + rank, 1);
          last_part = done == wk.parts - 1;
          if (last_part) counters[CL * wk.tt + rank] = 0;  // ready for the next launch
        }
        consumer_sync();
        store = last_part;
        if (store) {
          __threadfence();
          const long long W = (long long)tail * units, base = (long long)wk.tt * units;
          const int first = sk_owner(base, sk, W);
          for (int ob = first; ob < first + wk.parts; ++ob) {
            if (ob == b) continue;
            const int oslot = 2 * (CL * ob + rank) + (wk.tt != sk_first_tile(ob, sk, W, units));
            const float4* other = part_sums + (long long)oslot * (NT * 32);
#pragma unroll
            for (int i = 0; i < NT / 8; ++i) {
              const float4 v = __ldcg(other + i * 256 + ct);
              acc[4 * i] += v.x;
              acc[4 * i + 1] += v.y;
              acc[4 * i + 2] += v.z;
              acc[4 * i + 3] += v.w;
            }
          }
        }
      }
      if (store) {  // through shared memory (stmatrix) and the TMA, which leaves out the rows past M
        const int wg = warp >> 2, j = lane & 7, mat = lane >> 3;
        const u32 tile_wg = ys + wg * TILE;
        if ((ct & 127) == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // the last store has read it
        warpgroup_sync(wg);
        // accumulator 4 c + r: channel g (+ 8 for r >= 2) of this warp's 16, row m0 + 8 c + 2 t (+ 1 for odd r);
        // matrix mat of a stmatrix: rows 8 (c + mat / 2) .. + 7, channels 8 (mat % 2) .. + 7 of the warp's 16,
        // whose 16 bytes are chunk 2 (warp % 4) + mat % 2 of the row's 128, swizzled (chunk ^ row % 8)
#pragma unroll
        for (int c = 0; c < NT / 8; c += 2) {
          const u32 row = 8 * (c + (mat >> 1)) + j, chunk = 2 * (warp & 3) + (mat & 1);
          stmatrix_x4_trans(tile_wg + row * 128 + ((chunk ^ j) << 4), pack_bf16x2(acc[4 * c], acc[4 * c + 1]),
                            pack_bf16x2(acc[4 * c + 2], acc[4 * c + 3]), pack_bf16x2(acc[4 * c + 4], acc[4 * c + 5]),
                            pack_bf16x2(acc[4 * c + 6], acc[4 * c + 7]));
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the TMA
        warpgroup_sync(wg);
        if ((ct & 127) == 0) tma_store_2d(&ymap, tile_wg, wk.nb0 * 16 + wg * 64, wk.m0);
      }
    }
    if ((ct & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
  if (CL > 1) cluster_sync();  // no block leaves while the others may still arrive on its barriers
}
""".replace("@WGMMA@", "".join(_wgmma_asm(nt) for nt in (64, 128, 192, 256)))

_COMPILED: dict = {}  # (kernel name, device index) -> torch's compiled-kernel object

_COMPILES: dict = {}  # device index -> whether NVRTC compiled the kernel for sm_90a there


def gemm_supported(device: torch.device, w: Int4MMAWeight | None = None) -> bool:
    """Whether the wgmma GEMM runs here (on ``w``): a Hopper GPU (sm_90: wgmma and TMA), NVRTC compiling the
    kernel for sm_90a (tried once per device), and N a multiple of 128."""
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    if w is not None and w.n % 128:
        return False
    if device.index not in _COMPILES:
        try:
            nt, stages = gemm_config(4096)  # the kernels are compiled per config; this tries one
            for cl in (1, 2):
                _kernel(f"int4_wgmma<{nt}, {stages}, {cl}>", device, _smem_bytes(nt, stages))
            _COMPILES[device.index] = True
        except Exception:  # noqa: BLE001 (no NVRTC, or a torch without _compile_kernel)
            _COMPILES[device.index] = False
    return _COMPILES[device.index]


def gemm_config(m: int) -> tuple[int, int]:
    """(NT, STAGES): rows of x per tile and ring depth. 128-row tiles and 8 stages up to M = 128 (where 256 rows
    would leave most of the chip idle); else 256 rows and 4 stages, all the room that the output tile leaves.
    192-row tiles made fewer rounds of tiles at some shapes but were slower at all four where they did (on an
    H100, 0.87-0.97x bf16 against 1.01-1.07x with 256 rows: benchmarks/notes/int4_kernel.md, v13)."""
    return (128, 8) if m <= 128 else (256, 4)


def _smem_bytes(nt: int, stages: int) -> int:
    return stages * (nt * 128 + 4096 + 1024) + 2 * nt * 128 + 1024 + 16 * stages


def _kernel(name: str, device: torch.device, smem: int):
    key = (name, device.index)
    kern = _COMPILED.get(key)
    if kern is None:
        with torch.cuda.device(device):
            kern = torch.cuda._compile_kernel(_SOURCE, name, compute_capability="90a")
        err = _driver().cuFuncSetAttribute(kern.func, 8, smem)  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        if err:
            raise RuntimeError(f"cuFuncSetAttribute({name}) failed with CUDA error {err}")
        _COMPILED[key] = kern
    return kern


def _map_buffer() -> tuple:
    """Room for one TMA descriptor: (the buffer to keep alive, its 64-byte-aligned 128 bytes)."""
    buf = (ctypes.c_ubyte * 192)()
    return buf, (ctypes.c_ubyte * 128).from_address((ctypes.addressof(buf) + 63) & ~63)


def _encode_into(out, dtype: int, ptr: int, dims, strides, box, ones, swizzle: int) -> None:
    """cuTensorMapEncodeTiled into ``out`` (ctypes arrays: dims innermost first, strides in bytes of dims 1..,
    the box in elements), no interleave, L2 promotion 256 B, zeros out of bounds."""
    err = _driver().cuTensorMapEncodeTiled(out, dtype, len(dims), ctypes.c_void_p(ptr), dims, strides, box, ones,
                                           0, swizzle, 3, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUDA error {err} (dims {list(dims)}, box {list(box)})")


def _encode(dtype: int, dims: tuple, strides: tuple, box: tuple, ptr: int, swizzle: int) -> ctypes.Array:
    """A TMA descriptor (see :func:`_encode_into`) as 128 bytes of its own."""
    keep, view = _map_buffer()
    r = len(dims)
    _encode_into(view, dtype, ptr, (ctypes.c_uint64 * r)(*dims), (ctypes.c_uint64 * (r - 1))(*strides),
                 (ctypes.c_uint32 * r)(*box), (ctypes.c_uint32 * r)(*([1] * r)), swizzle)
    out = (ctypes.c_ubyte * 128)()
    ctypes.memmove(out, view, 128)
    return out


_WMAPS: dict = {}  # (words pointer, meta pointer, shapes) -> the weight's two descriptors


def _weight_maps(w: Int4MMAWeight) -> tuple:
    """Descriptors of the words (half a unit of 8 blocks of 16 channels per box) and of the scales/zeros (a
    group's 8 blocks per box). They depend only on addresses and shapes."""
    key = (w.words.data_ptr(), w.meta.data_ptr(), tuple(w.words.shape), tuple(w.meta.shape))
    maps = _WMAPS.get(key)
    if maps is None:
        nbs, units, groups = w.words.shape[0], w.words.shape[1], w.meta.shape[1]
        # UINT32 = 2; words (nb, u x 256): half a unit's 512 bytes (words[nb, u, h]) of 8 blocks per box
        wmap = _encode(2, (units * 256, nbs), (units * 1024,), (128, 8), w.words.data_ptr(), 0)
        mmap = _encode(2, (32, groups, nbs), (128, groups * 128), (32, 1, 8), w.meta.data_ptr(), 0)
        maps = _WMAPS[key] = (wmap, mmap)
    return maps


class _Plan:
    """The launch of one (device, stream, M, K, N, NT, STAGES, cluster): its ctypes objects, the schedule, the
    counters and the float32 workspace, made once; a call re-encodes x's descriptor and sets two pointers."""

    def __init__(self, dev: torch.device, stream: int, m: int, k: int, n: int, nt: int, stages: int, cl: int,
                 stream_k: bool, band: int, pdl: bool) -> None:
        self.smem = _smem_bytes(nt, stages)
        self.kern = _kernel(f"int4_wgmma<{nt}, {stages}, {cl}>", dev, self.smem)
        # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, and PROGRAMMATIC_STREAM_SERIALIZATION with ``pdl``
        self.attrs = (_LaunchAttr * 2)(_LaunchAttr(4, b"", (ctypes.c_int * 16)(cl, 1, 1)), _PDL)
        self.cfg = _LaunchConfig((ctypes.c_uint * 3)(cl, 1, 1), (ctypes.c_uint * 3)(384, 1, 1), self.smem,
                                 ctypes.c_void_p(stream), self.attrs, 2 if pdl else 1)
        clusters = _max_clusters(self.kern.func, self.cfg, dev, cl)
        tiles_n, units = n // (128 * cl), k // 128  # in tiles of cl x 128 channels
        tiles = tiles_n * -(-m // nt)
        whole, tail, sk = schedule(tiles, units, clusters) if stream_k else (tiles, 0, 0)
        # partial sums: two slots per stream-K block; a counter per tail tile and block (each launch leaves them
        # at zero)
        self.part_sums = torch.empty(max(1, 2 * sk * cl * nt * 128), device=dev, dtype=torch.float32)
        self.counters = torch.zeros(max(1, tail * cl), device=dev, dtype=torch.int32)
        self.xbuf, self.xmap = _map_buffer()
        self.xdims = (ctypes.c_uint64 * 2)(k, m)
        self.xstride = (ctypes.c_uint64 * 1)(0)
        self.xbox = (ctypes.c_uint32 * 2)(64, nt // cl)  # each block of a cluster loads its share of the rows
        self.ones = (ctypes.c_uint32 * 2)(1, 1)
        self.ybuf, self.ymap = _map_buffer()
        self.ydims = (ctypes.c_uint64 * 2)(n, m)
        self.ystride = (ctypes.c_uint64 * 1)(n * 2)
        self.ybox = (ctypes.c_uint32 * 2)(64, nt)  # a warpgroup's 64 channels x NT rows
        self.ints = [ctypes.c_void_p(self.part_sums.data_ptr()), ctypes.c_void_p(self.counters.data_ptr()),
                     *(ctypes.c_int(v) for v in (m, units, 0, tiles_n, whole, tail, sk, band))]
        self.unit_shift = self.ints[4]
        self.cfg.grid[0] = max(min(clusters, whole), sk) * cl
        self.cfg_ref = ctypes.byref(self.cfg)
        self.maps = self.ptrs = None

    def launch(self, x2: torch.Tensor, w: Int4MMAWeight, y: torch.Tensor) -> None:
        self.xstride[0] = x2.stride(0) * 2
        # BFLOAT16 = 9: boxes of 64 inputs x NT rows, 128-byte swizzle (3), zeros past M
        _encode_into(self.xmap, 9, x2.data_ptr(), self.xdims, self.xstride, self.xbox, self.ones, 3)
        _encode_into(self.ymap, 9, y.data_ptr(), self.ydims, self.ystride, self.ybox, self.ones, 3)  # y: the same
        maps = _weight_maps(w)
        if maps is not self.maps:  # the argument pointers, remade when the weight changes
            self.maps = maps
            self.ptrs = (ctypes.c_void_p * 14)(*(ctypes.addressof(v) for v in (self.xmap, *maps, self.ymap, *self.ints)))
        self.unit_shift.value = w.unit_shift
        err = _driver().cuLaunchKernelEx(self.cfg_ref, self.kern.func, self.ptrs, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx(int4_wgmma) failed with CUDA error {err}")


_PLANS: dict = {}
_CLUSTERS: dict = {}  # (kernel, cluster size) -> how many clusters fit on the device at once


def _max_clusters(func, cfg: _LaunchConfig, dev: torch.device, cl: int) -> int:
    """How many clusters of ``cl`` blocks (one block per SM) can run at once: the SMs / cl, or fewer where the
    GPU's partitions hold an odd number of SMs (cuOccupancyMaxActiveClusters)."""
    key = (func.value if hasattr(func, "value") else func, cl)
    if key not in _CLUSTERS:
        n = ctypes.c_int(0)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        if cl == 1 or _driver().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg)):
            n.value = sms // cl
        _CLUSTERS[key] = max(1, min(n.value, sms // cl))
    return _CLUSTERS[key]


def schedule(tiles: int, units: int, sms: int, min_units: int = 4) -> tuple[int, int, int]:
    """(whole, tail, sk): the first ``whole`` tiles are computed whole, round-robin over the ``sms`` blocks (or
    clusters); the last ``tail`` tiles (less than one round) are cut into ``sk`` equal shares of their units
    ("stream-K"), one per block, so that the last round keeps the whole chip busy. Each share has at least
    ``min_units`` units of 128 inputs. Only a last round at most half full is cut: the partial sums cost more
    than they save in a fuller one (on an H100, int4_gemm_sweep.jsonl)."""
    tail = tiles % sms
    sk = min(sms, tail * units // min_units)
    if tail == 0 or 2 * tail > sms or sk <= tail:
        return tiles, 0, 0
    return tiles - tail, tail, sk


def pieces(b: int, grid: int, tiles_n: int, units: int, whole: int, tail: int, sk: int) -> list[dict]:
    """Block ``b``'s pieces of work, as the kernel's ``piece`` walks them (here for the tests): ``tile``,
    units ``u0..u1``, and for a part of a tile its tail tile ``tt``, the tile's number of ``parts`` and the
    partial-sum ``slot``."""
    out = [dict(tile=t, u0=0, u1=units, tt=-1, parts=1, slot=0) for t in range(b, whole, grid)]
    if b < sk:
        w = tail * units
        e0, e1 = w * b // sk, w * (b + 1) // sk

        def owner(x: int) -> int:
            return (sk * (x + 1) - 1) // w

        for tt in range(e0 // units, tail):
            base = tt * units
            x0, x1 = max(e0, base), min(e1, base + units)
            if x0 >= x1:
                break
            p = dict(tile=whole + tt, u0=x0 - base, u1=x1 - base, tt=-1, parts=1, slot=0)
            if x1 - x0 < units:
                p.update(tt=tt, parts=owner(base + units - 1) - owner(base) + 1, slot=2 * b + (tt != e0 // units))
            out.append(p)
    return out


def int4_gemm(x: torch.Tensor, w: Int4MMAWeight, nt: int | None = None, stages: int | None = None,
              stream_k: bool = True, cluster: int | None = None, band: int = 8, pdl: bool = True) -> torch.Tensor:
    """x (..., K) bf16 -> (..., N) bf16 with the wgmma kernel (any number of rows). ``nt``/``stages``: rows per
    tile and ring depth (default :func:`gemm_config`); ``stream_k``: split a last round at most half full over K
    (:func:`schedule`); ``cluster``: blocks per cluster sharing x, 1 or 2 (default 2 where N is a multiple of 256);
    ``band``: row tiles per band of the tile order (rows fastest within a band); ``pdl``: launch as a programmatic
    dependent launch (the kernel is set up while the previous one on the stream ends). The defaults are what the
    H100 measurements chose (benchmarks/notes/int4_kernel.md)."""
    k, n = w.k, w.n
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"int4_gemm takes bf16 x (..., {k}); got {x.dtype} {tuple(x.shape)}")
    if n % 128:
        raise ValueError(f"int4_gemm needs N a multiple of 128; got {n}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    dev = x.device
    given = nt is not None and stages is not None  # else both come from gemm_config, once per plan
    if given and (nt not in (64, 128, 192, 256) or stages < 3 or _smem_bytes(nt, stages) > 226 * 1024):
        raise ValueError(f"int4_gemm: NT {nt} must be 64, 128, 192 or 256, and the stages ({stages}) at least 3 "
                         "(the consumers hold two slots, the stage in flight and the one being issued) and fit 226 KB")
    stream = torch._C._cuda_getCurrentRawStream(dev.index)
    cl = cluster or (2 if n % 256 == 0 else 1)
    if cl not in (1, 2) or n % (128 * cl):
        raise ValueError(f"int4_gemm: a cluster of {cl} blocks needs N a multiple of {128 * cl}; got {n}")
    key = (dev.index, stream, m, k, n, nt if given else None, stages if given else None, cl, stream_k, band, pdl,
           threading.get_ident())
    plan = _PLANS.get(key)
    if plan is None:
        if not given:
            nt, stages = gemm_config(m)
        plan = _PLANS[key] = _Plan(dev, stream, m, k, n, nt, stages, cl, stream_k, band, pdl)
    plan.launch(x2, w, y)
    return y.reshape(*x.shape[:-1], n)
