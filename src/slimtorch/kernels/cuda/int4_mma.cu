
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
