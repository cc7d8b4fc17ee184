
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
