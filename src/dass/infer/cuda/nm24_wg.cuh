// 2:4 products of the output orientation (groups of 4 along N) for 16-128 tokens on Hopper
// (sm_90a): the weight expanded in registers feeds warpgroup MMAs (wgmma) directly.
//
// Why a third kernel: the output orientation cannot use the sparse tensor cores, so it
// computes as dense, and at 64-128 tokens dense mma.sync runs out of issue rate before the
// weight stream reaches the memory's rate (64 mma.sync a 32x32 weight tile at 128 tokens;
// docs/speed.md). wgmma does the same arithmetic at the tensor cores' full rate, reads the
// tokens (operand B) from shared memory itself, with no ldmatrix, and runs asynchronously
// while the warps expand the next step's weights:
//
// - a block is WG x TS warpgroups (4 warps each; TS of them share rows and split the tokens,
//   so 128 tokens need 64 accumulators a tile, not 128); warp w owns MT row tiles of 32 rows (the
//   packed layout of layout.py: the lane holds all 4 rows of its 2:4 groups), expanded per
//   16-K half into two dense m16 A fragments (expand_half), which are exactly the A register
//   fragments of wgmma.m64nNk16 (warp w supplies rows 16w..16w+15 of the 64);
// - the tokens of a stage sit in shared memory as [16-byte K chunk][token] (the "core
//   matrices" of wgmma's K-major no-swizzle layout: 8 tokens x 16 bytes contiguous), so one
//   descriptor per (stage, 16-K half) addresses all NTOK tokens: leading byte offset (next K
//   chunk) NTOK * 16, stride byte offset (next 8 tokens) 128;
// - weights and tokens share one cp.async ring of STAGES stages, prefetched STAGES - 2
//   ahead, so a slot is only refilled two stages after the wgmmas that read it were waited;
// - split-K with the deterministic in-kernel fix-up of nm24_smem.cuh.
#pragma once
#include "nm24_smem.cuh"
#include "nm24_wgmma_ops.cuh"

namespace dass24 {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Matrix descriptor of a K-major, unswizzled operand: start address, leading byte offset
// (between core matrices along K), stride byte offset (between 8-row groups), all >> 4.
__device__ __forceinline__ uint64_t wg_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}

// WG warpgroups along the rows times TS along the tokens (each of those has NTOK / TS).
template <int MT, int NTOK, int KS, int WG, int TS>
struct WgShape {
  static constexpr int THREADS = WG * TS * 128;
  static constexpr int NW = NTOK / TS;            // tokens of one warpgroup (its wgmma's N)
  static constexpr int TILES = WG * 4 * MT;       // 32-row tiles of a block
  static constexpr int CH = KS * 4;               // 16-byte K chunks of a token row per stage
  static constexpr int X_U4 = NTOK * CH;
  static constexpr int VPT = KS * 64;             // value chunks per tile and stage
  static constexpr int MPT = KS * 8;              // metadata chunks per tile and stage
  static constexpr int W_U4 = TILES * (VPT + MPT);
  static constexpr int STAGE_U4 = X_U4 + W_U4;
  static constexpr int ACC = MT * NW;             // fp32 accumulators per thread (2 x NW/2 a tile)
  // One-warpgroup blocks run two an SM when a 4-stage ring fits in half the shared memory.
  static constexpr int MINB = (WG * TS == 1 && 4 * STAGE_U4 * 16 <= 110 * 1024) ? 2 : 1;
  static constexpr int BUDGET = (MINB == 2 ? 110 : 220) * 1024;
  static constexpr int STAGES_FIT = BUDGET / (STAGE_U4 * 16);
  static constexpr int STAGES = STAGES_FIT > 8 ? 8 : STAGES_FIT;
  static constexpr int SMEM = STAGES * STAGE_U4 * 16;
  static_assert(STAGES >= 4, "a 4-stage ring of this configuration does not fit in shared memory");
  static_assert(KS % 2 == 0, "two K-steps a stage at least");
  static_assert(NTOK % TS == 0 && NW % 8 == 0, "whole token tiles a warpgroup");
};

template <typename E, int MT, int NTOK, int KS, int WG, int TS>
__global__ void __launch_bounds__(WG * TS * 128, (WgShape<MT, NTOK, KS, WG, TS>::MINB)) nm24_wg_kernel(Params p) {
#if DASS24_HAS_WGMMA
  using S = WgShape<MT, NTOK, KS, WG, TS>;
  constexpr int NW = S::NW;
  constexpr int STAGES = S::STAGES;
  constexpr int PRE = STAGES - 2;  // stages in flight ahead of the one computed
  extern __shared__ uint4 smem[];
  __shared__ int last_flag;

  const int tid = threadIdx.x, lane = tid & 31;
  const int wgi = tid >> 7;                        // warpgroup
  const int tg = wgi / WG;                         // its token group
  const int warp = (wgi % WG) * 4 + ((tid >> 5) & 3);  // its warp's row position in the block
  const int g = lane >> 2;
  const int ntile = p.N / 32;
  const int btile0 = blockIdx.x * S::TILES;
  const int ksteps = p.K / 32;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int s_end = min(ksteps, s_begin + p.steps_per_split);
  const int nstage = (s_end - s_begin) / KS;
  const E* __restrict__ X = reinterpret_cast<const E*>(p.x);
  const uint4* __restrict__ M4 = reinterpret_cast<const uint4*>(p.meta);

  auto load_stage = [&](int st) {
    if (st < nstage) {
      uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
      uint4* vs = xs + S::X_U4;
      uint4* ms = vs + S::TILES * S::VPT;
      const int s0 = s_begin + st * KS;
      const int kcol0 = s0 * 32;
      // tokens: lane -> (token lane % 8, chunk lane / 8): 4 lanes read 64 contiguous bytes of
      // a row, 8 lanes of one chunk write 128 contiguous bytes (one core matrix)
#pragma unroll
      for (int i = tid; i < S::X_U4; i += S::THREADS) {
        const int r_lo = i & 7, c_lo = (i >> 3) & 3, rest = i >> 5;
        const int row = (rest % (NTOK / 8)) * 8 + r_lo;
        const int ch = (rest / (NTOK / 8)) * 4 + c_lo;
        const bool ok = row < p.T;
        const E* src = ok ? X + (size_t)row * p.K + kcol0 + ch * 8 : X;
        cp_async16(xs + ch * NTOK + row, src, ok);
      }
#pragma unroll
      for (int i = tid; i < S::TILES * S::VPT; i += S::THREADS) {
        const int j = i / S::VPT, o = i % S::VPT;
        const int tt = btile0 + j;
        const bool ok = tt < ntile;
        cp_async16(vs + i, ok ? p.vals + ((size_t)tt * ksteps + s0) * 64 + o : p.vals, ok);
      }
#pragma unroll
      for (int i = tid; i < S::TILES * S::MPT; i += S::THREADS) {
        const int j = i / S::MPT, o = i % S::MPT;
        const int tt = btile0 + j;
        const bool ok = tt < ntile;
        cp_async16(ms + i, ok ? M4 + ((size_t)tt * ksteps + s0) * 8 + o : M4, ok);
      }
    }
    cp_async_commit();
  };

  float acc[MT][2][NW / 2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int c = 0; c < NW / 2; ++c) acc[m][f][c] = 0.f;

  const uint32_t lbo = p.wg_swap ? 128u : (uint32_t)NTOK * 16u;
  const uint32_t sbo = p.wg_swap ? (uint32_t)NTOK * 16u : 128u;
  // A fragments double-buffered by K-step parity (expansion overlaps the previous step's
  // wgmmas) unless the accumulators leave no registers for that (then a wait first)
  constexpr int NB = S::ACC >= 128 ? 1 : 2;
  uint32_t fa[NB][MT][2][4], fb[NB][MT][2][4];

  auto compute = [&](int st) {
    const uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
    const uint4* vs = xs + S::X_U4;
    const uint32_t* ms = reinterpret_cast<const uint32_t*>(vs + S::TILES * S::VPT);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const int b = kk % NB;
      uint32_t e[MT];
      uint4 v[MT][2];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int j = warp * MT + m;
        e[m] = lds32(ms + (j * KS + kk) * 32 + lane);
#pragma unroll
        for (int h = 0; h < 2; ++h) v[m][h] = lds128(vs + ((j * KS + kk) * 2 + h) * 32 + lane);
      }
      if constexpr (NB == 1) wgmma_wait<0>();  // the fragments are about to be rewritten
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) expand_half(v[m][h], e[m] >> (16 * h), fa[b][m][h], fb[b][m][h]);
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint64_t d = wg_desc(xs + (kk * 4 + 2 * h) * NTOK + tg * NW, lbo, sbo);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          wgmma_rs<E, NW>(acc[m][0], fa[b][m][h], d);
          wgmma_rs<E, NW>(acc[m][1], fb[b][m][h], d);
        }
      }
      wgmma_commit();
      if constexpr (NB == 2) wgmma_wait<1>();  // the previous K-step's group is done: its fragments are free
    }
  };

#pragma unroll
  for (int st = 0; st < PRE; ++st) load_stage(st);
#pragma unroll 1
  for (int st = 0; st < nstage; ++st) {
    cp_async_wait<PRE - 1>();
    fence_proxy_async();  // this thread's copies, visible to the tensor cores' reads
    __syncthreads();      // everyone's copies landed; slot (st - 2) % STAGES is no longer read
    load_stage(st + PRE);
    compute(st);
  }
  wgmma_wait<0>();
  cp_async_wait<0>();

  const int splits = gridDim.y;
  if (splits > 1) {
    float4* ws4 = reinterpret_cast<float4*>(p.ws);
    constexpr int A4 = S::ACC / 4;
    const int me = blockIdx.y;
    auto slot = [&](int s, int j) { return ((size_t)(blockIdx.x * splits + s) * A4 + j) * S::THREADS + tid; };
    float* flat = &acc[0][0][0];
#pragma unroll
    for (int j = 0; j < A4; ++j)
      __stcg(ws4 + slot(me, j), make_float4(flat[4 * j], flat[4 * j + 1], flat[4 * j + 2], flat[4 * j + 3]));
    __threadfence();
    __syncthreads();
    if (tid == 0) last_flag = atomicAdd(p.counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
    // every slice's partial (this block's too) in slice order: the same bits whichever
    // slice arrived last, with no second set of accumulators live
#pragma unroll 1
    for (int s = 0; s < splits; ++s) {
#pragma unroll
      for (int j = 0; j < A4; ++j) {
        const float4 v = __ldcg(ws4 + slot(s, j));
        if (s == 0) {
          flat[4 * j] = v.x;
          flat[4 * j + 1] = v.y;
          flat[4 * j + 2] = v.z;
          flat[4 * j + 3] = v.w;
        } else {
          flat[4 * j] += v.x;
          flat[4 * j + 1] += v.y;
          flat[4 * j + 2] += v.z;
          flat[4 * j + 3] += v.w;
        }
      }
    }
    if (tid == 0) p.counters[blockIdx.x] = 0;
  }

  // acc[m][f][4n + c]: tile f's fragment row g (c < 2) or g + 8 (c >= 2), token 8n + 2t + c % 2;
  // fragment rows g, g + 8 of tile f are the matrix rows 32 tt + 4g + 2f + {0, 1}.
  const int t = lane & 3;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tt = btile0 + warp * MT + m;
    if (tt >= ntile) continue;
    const int row0 = tt * 32 + 4 * g;
    float bv[4] = {0.f, 0.f, 0.f, 0.f};
    if (p.bias) {
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = Mma<E>::to_f(p.bias, row0 + q);
    }
#pragma unroll
    for (int n = 0; n < NW / 8; ++n) {
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const int tok = tg * NW + n * 8 + 2 * t + c2;
        if (tok >= p.T) continue;
        const float v[4] = {acc[m][0][4 * n + c2], acc[m][0][4 * n + 2 + c2], acc[m][1][4 * n + c2],
                            acc[m][1][4 * n + 2 + c2]};
        uint16_t hv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) hv[q] = Mma<E>::from_f(v[q] + bv[q]);
        uint2 out;
        out.x = (uint32_t)hv[0] | ((uint32_t)hv[1] << 16);
        out.y = (uint32_t)hv[2] | ((uint32_t)hv[3] << 16);
        *reinterpret_cast<uint2*>(reinterpret_cast<uint16_t*>(p.y) + (size_t)tok * p.N + row0) = out;
      }
    }
  }
#else
  __trap();  // built for a GPU without wgmma: the host refuses before launching
#endif
}

template <typename E, int MT, int NTOK, int KS, int WG, int TS>
cudaError_t launch_wg(const Params& p, int splits, cudaStream_t stream) {
  using S = WgShape<MT, NTOK, KS, WG, TS>;
  auto kern = nm24_wg_kernel<E, MT, NTOK, KS, WG, TS>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM);
  if (err != cudaSuccess) return err;
  dim3 grid((p.N / 32 + S::TILES - 1) / S::TILES, splits);
  kern<<<grid, S::THREADS, S::SMEM, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dass24
