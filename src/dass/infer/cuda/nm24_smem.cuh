// 2:4 sparse x dense products for 16-128 tokens with both operands staged in shared memory.
//
// Why a second kernel: the register kernel (nm24_kernels.cuh) gives each warp all the
// tokens and streams the weight straight into registers. Past about 32 tokens that stops
// paying: its accumulators leave no registers for weights in flight, and every block
// re-reads the whole token tile from L2 for only 64-128 rows of weight, so the L2 traffic of
// x (blocks x T x K x 2 bytes) outgrows the weight stream itself. Here:
//
// - a block is WM x WN warps (8): warp (wm, wn) owns MT row tiles and NTW token tiles of 8,
//   so the block covers WM*MT row tiles (128-256 rows) and all WN*NTW*8 tokens; x is read
//   from L2 once per 128-256 rows, and a weight fragment loaded once feeds WN warps;
// - the weight and x go through one STAGES-deep cp.async ring (16-byte copies of the
//   fragment-ordered layout, fully coalesced; each lane later reads its own fragment back
//   with one conflict-free 16-byte shared load), so the bytes in flight per SM are set by
//   the ring, not by the registers;
// - split-K ends with a fix-up inside the kernel instead of atomics and a second kernel:
//   each K-slice stores its fp32 partial in its threads' own order, the last slice of a row
//   block to arrive (a counter per block) adds the others in slice order (deterministic),
//   writes the 16-bit result and resets the counter for the next call.
#pragma once
#include "nm24_kernels.cuh"

namespace dass24 {

__device__ __forceinline__ uint4 lds128(const uint4* p) {
  uint4 v;
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(s));
  return v;
}
__device__ __forceinline__ uint32_t lds32(const uint32_t* p) {
  uint32_t v;
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(s));
  return v;
}

template <int ORI, int MT, int NTW, int KS, int WM, int WN>
struct SmemShape {
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int ROWS = ORI == 0 ? 16 : 32;  // rows of one warp tile
  static constexpr int NF = ORI == 0 ? 1 : 2;      // m16 fragments per warp tile
  static constexpr int TILES = WM * MT;            // row tiles of a block
  static constexpr int TOK = WN * NTW * 8;         // tokens of a block
  static constexpr int CH = KS * 4;                // 16-byte chunks of a token row per stage
  static constexpr int X_U4 = TOK * CH;
  static constexpr int VPT = KS * 32 * (ORI == 0 ? 1 : 2);  // value chunks per tile and stage
  static constexpr int MPT = KS * (ORI == 0 ? 4 : 8);       // metadata chunks per tile and stage
  static constexpr int W_U4 = TILES * (VPT + MPT);
  static constexpr int STAGE_U4 = X_U4 + W_U4;
  static constexpr int ACC = MT * NF * NTW * 4;   // fp32 accumulators per thread
  // Two blocks an SM (128 registers a thread) when the accumulators are small enough not to
  // spill and each block still gets a 3-stage ring.
  static constexpr int MINB = (ACC <= 32 && 3 * STAGE_U4 * 16 <= 110 * 1024) ? 2 : 1;
  static constexpr int BUDGET = (MINB == 2 ? 110 : 220) * 1024;
  static constexpr int STAGES_FIT = BUDGET / (STAGE_U4 * 16);
  static constexpr int STAGES = STAGES_FIT > 6 ? 6 : STAGES_FIT;
  static constexpr int SMEM = STAGES * STAGE_U4 * 16;
  static_assert(STAGES >= 2, "a stage of this configuration does not fit twice in shared memory");
  static_assert(CH % 8 == 0, "the shared-memory swizzle needs KS >= 2");
  static_assert(KS % 2 == 0, "metadata comes in pairs of K-steps");
};

template <typename E, int ORI, int MT, int NTW, int KS, int WM, int WN>
__global__ void __launch_bounds__(WM * WN * 32, (SmemShape<ORI, MT, NTW, KS, WM, WN>::MINB))
    nm24_smem_kernel(Params p) {
  using S = SmemShape<ORI, MT, NTW, KS, WM, WN>;
  constexpr int STAGES = S::STAGES;
  extern __shared__ uint4 smem[];
  __shared__ int last_flag;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;
  const int ntile = p.N / S::ROWS;
  const int btile0 = blockIdx.x * S::TILES;  // first row tile of the block
  const int ksteps = p.K / 32;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int s_end = min(ksteps, s_begin + p.steps_per_split);
  const int nstage = (s_end - s_begin) / KS;
  const E* __restrict__ X = reinterpret_cast<const E*>(p.x);
  const uint4* __restrict__ M4 = reinterpret_cast<const uint4*>(p.meta);

  // One stage: x [TOK][CH] (swizzled), then values [TILES][VPT], then metadata [TILES][MPT].
  auto load_stage = [&](int st) {
    if (st < nstage) {
      uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
      uint4* vs = xs + S::X_U4;
      uint4* ms = vs + S::TILES * S::VPT;
      const int s0 = s_begin + st * KS;
      const int kcol0 = s0 * 32;
#pragma unroll
      for (int i = tid; i < S::X_U4; i += S::THREADS) {
        const int row = i / S::CH, ch = i % S::CH;
        const bool ok = row < p.T;
        const E* src = ok ? X + (size_t)row * p.K + kcol0 + ch * 8 : X;
        cp_async16(xs + row * S::CH + (ch ^ (row & 7)), src, ok);
      }
#pragma unroll
      for (int i = tid; i < S::TILES * S::VPT; i += S::THREADS) {
        const int j = i / S::VPT, o = i % S::VPT;
        const int tt = btile0 + j;
        const bool ok = tt < ntile;
        const uint4* src = ok ? p.vals + ((size_t)tt * ksteps + s0) * (S::VPT / KS) + o : p.vals;
        cp_async16(vs + i, src, ok);
      }
#pragma unroll
      for (int i = tid; i < S::TILES * S::MPT; i += S::THREADS) {
        const int j = i / S::MPT, o = i % S::MPT;
        const int tt = btile0 + j;
        const bool ok = tt < ntile;
        const size_t base = ORI == 0 ? ((size_t)tt * (ksteps / 2) + s0 / 2) * 8 : ((size_t)tt * ksteps + s0) * 8;
        cp_async16(ms + i, ok ? M4 + base + o : M4, ok);
      }
    }
    cp_async_commit();
  };

  float acc[MT][S::NF][NTW][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int f = 0; f < S::NF; ++f)
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][f][nt][c] = 0.f;

  auto compute = [&](int st) {
    const uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
    const uint4* vs = xs + S::X_U4;
    const uint32_t* ms = reinterpret_cast<const uint32_t*>(vs + S::TILES * S::VPT);
    const int mrow = lane & 7, mat = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if constexpr (ORI == 0) {
        uint4 a[MT];
        uint32_t e[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const int j = wm * MT + m;
          a[m] = lds128(vs + (j * KS + kk) * 32 + lane);
          e[m] = lds32(ms + (j * (KS / 2) + kk / 2) * 32 + lane);
        }
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
          uint32_t b[4];
          const int row = (wn * NTW + nt) * 8 + mrow;
          ldmatrix_x4(b, xs + row * S::CH + ((kk * 4 + mat) ^ (row & 7)));
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (kk % 2 == 0)
              Mma<E>::template sp<0>(acc[m][0][nt], a[m], b, e[m]);
            else
              Mma<E>::template sp<1>(acc[m][0][nt], a[m], b, e[m]);
          }
        }
      } else {
        uint32_t fa[MT][2][4], fb[MT][2][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const int j = wm * MT + m;
          const uint32_t e = lds32(ms + (j * KS + kk) * 32 + lane);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 v = lds128(vs + ((j * KS + kk) * 2 + h) * 32 + lane);
            expand_half(v, e >> (16 * h), fa[m][h], fb[m][h]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
          uint32_t b[4];
          const int row = (wn * NTW + nt) * 8 + mrow;
          ldmatrix_x4(b, xs + row * S::CH + ((kk * 4 + mat) ^ (row & 7)));
#pragma unroll
          for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              Mma<E>::dense(acc[m][0][nt], fa[m][h], b[2 * h], b[2 * h + 1]);
              Mma<E>::dense(acc[m][1][nt], fb[m][h], b[2 * h], b[2 * h + 1]);
            }
        }
      }
    }
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) load_stage(st);
#pragma unroll 1
  for (int st = 0; st < nstage; ++st) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_stage(st + STAGES - 1);
    compute(st);
  }
  cp_async_wait<0>();

  // Split-K fix-up: partials in the threads' own order, the last slice adds them in order.
  const int splits = gridDim.y;
  if (splits > 1) {
    float4* ws4 = reinterpret_cast<float4*>(p.ws);
    constexpr int A4 = S::ACC / 4;
    const int me = blockIdx.y;
    auto slot = [&](int s, int j) { return ((size_t)(blockIdx.x * splits + s) * A4 + j) * S::THREADS + tid; };
    float* flat = &acc[0][0][0][0];
#pragma unroll
    for (int j = 0; j < A4; ++j)
      __stcg(ws4 + slot(me, j), make_float4(flat[4 * j], flat[4 * j + 1], flat[4 * j + 2], flat[4 * j + 3]));
    __threadfence();
    __syncthreads();
    if (tid == 0) last_flag = atomicAdd(p.counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < A4; ++j) {
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < splits; ++s) {
        const float4 v = s == me ? make_float4(flat[4 * j], flat[4 * j + 1], flat[4 * j + 2], flat[4 * j + 3])
                                 : __ldcg(ws4 + slot(s, j));
        sum.x += v.x;
        sum.y += v.y;
        sum.z += v.z;
        sum.w += v.w;
      }
      flat[4 * j] = sum.x;
      flat[4 * j + 1] = sum.y;
      flat[4 * j + 2] = sum.z;
      flat[4 * j + 3] = sum.w;
    }
    if (tid == 0) p.counters[blockIdx.x] = 0;  // ready for the next call
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tt = btile0 + wm * MT + m;
    if (tt >= ntile) continue;
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const int tok = (wn * NTW + nt) * 8 + 2 * t + c2;
        if (tok >= p.T) continue;
        if constexpr (ORI == 0) {
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            const int row = tt * 16 + g + 8 * hi;
            float v = acc[m][0][nt][2 * hi + c2];
            if (p.bias) v += Mma<E>::to_f(p.bias, row);
            reinterpret_cast<uint16_t*>(p.y)[(size_t)tok * p.N + row] = Mma<E>::from_f(v);
          }
        } else {
          const int row0 = tt * 32 + 4 * g;
          float v[4] = {acc[m][0][nt][c2], acc[m][0][nt][2 + c2], acc[m][1][nt][c2], acc[m][1][nt][2 + c2]};
          uint16_t h[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) h[q] = Mma<E>::from_f(p.bias ? v[q] + Mma<E>::to_f(p.bias, row0 + q) : v[q]);
          uint2 out;
          out.x = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
          out.y = (uint32_t)h[2] | ((uint32_t)h[3] << 16);
          *reinterpret_cast<uint2*>(reinterpret_cast<uint16_t*>(p.y) + (size_t)tok * p.N + row0) = out;
        }
      }
    }
  }
}

// Host-side launch; grid.x = row blocks, grid.y = K-slices (the caller sizes p.ws to
// splits x row blocks x block tile fp32 and p.counters to row blocks, zeroed once).
template <typename E, int ORI, int MT, int NTW, int KS, int WM, int WN>
cudaError_t launch_smem(const Params& p, int splits, cudaStream_t stream) {
  using S = SmemShape<ORI, MT, NTW, KS, WM, WN>;
  auto kern = nm24_smem_kernel<E, ORI, MT, NTW, KS, WM, WN>;
  if (S::SMEM > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM);
    if (err != cudaSuccess) return err;
  }
  const int ntile = p.N / S::ROWS;
  dim3 grid((ntile + S::TILES - 1) / S::TILES, splits);
  kern<<<grid, S::THREADS, S::SMEM, stream>>>(p);
  return cudaGetLastError();
}

// Rows of one block of a configuration (the host needs it for the workspace and counters).
template <int ORI, int MT, int WM>
constexpr int smem_block_rows() {
  return WM * MT * (ORI == 0 ? 16 : 32);
}

}  // namespace dass24
