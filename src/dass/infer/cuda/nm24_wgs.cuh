// 2:4 products of the input orientation (groups of 4 along K) for 16-128 tokens on Hopper
// (sm_90a): the packed weight streamed straight into registers is the sparse A operand of
// warpgroup MMAs (wgmma.mma_async.sp), the tokens their B operand in shared memory.
//
// Why a fourth kernel: at 64-128 tokens the register kernel (mma.sp.sync) spends its issue
// slots on B fragments, not on the weight stream: every warp loads every token fragment
// through ldmatrix for its own 16 rows (16 ldmatrix + 16 mma.sp a K-step and 16-row tile at
// 128 tokens), and its accumulators leave few registers for weight loads in flight.
// wgmma.sp reads B from shared memory itself, once per warpgroup (64 rows) rather than once
// per warp, in one instruction for all the tokens of a K-step, and runs asynchronously while
// the warps issue the next stage's weight loads.
//
// - a block is WG warpgroups along the rows; warpgroup i owns MT m64 tiles, tile m being the
//   four 16-row tiles of layout.py (warp w of the warpgroup loads tile 4 (i MT + m) + w: its
//   16 bytes a lane per K-step are exactly the A registers of rows 16w..16w+15, the same
//   fragment as mma.sp.m16n8k32's; the metadata word of a K-step pair serves both steps,
//   sparsity selector 0 for the even step, 1 for the odd one);
// - the weight goes global -> registers (double-buffered by stage: stage s + 1's loads are
//   issued as soon as stage s's wgmmas are, once stage s - 1's have been waited), or (WS)
//   through the shared-memory ring with the tokens;
// - the tokens sit in shared memory as [16-byte K chunk][token] (wgmma's K-major, unswizzled
//   core matrices, as in nm24_wg.cuh), a cp.async ring of STAGES slots filled STAGES - 2
//   ahead, so a slot is refilled only after the wgmmas that read it were waited;
// - split-K (grid.y > 1) adds fp32 partials with atomics into a zeroed workspace and the
//   finish kernel converts (the register kernel's in-kernel finish is not ported here: this
//   kernel wins no bucket yet).
#pragma once
#include "nm24_wg.cuh"

namespace dass24 {

// WS = 0: the weight goes global -> registers; WS = 1: it joins the tokens in the ring
// (16-byte cp.async copies of the fragment-ordered layout, each lane reading its own fragment
// back with one shared load just before the wgmma), so the bytes in flight are set by the
// ring's depth rather than by the registers left beside the accumulators.
template <int MT, int NTOK, int KS, int WG, int WS>
struct WgsShape {
  static constexpr int THREADS = WG * 128;
  static constexpr int TILES = WG * 4 * MT;   // 16-row tiles of a block
  static constexpr int CH = KS * 4;           // 16-byte K chunks of a token row per stage
  static constexpr int X_U4 = NTOK * CH;      // one stage of tokens
  static constexpr int V_U4 = WS ? TILES * KS * 32 : 0;      // one stage of values
  static constexpr int M_U4 = WS ? TILES * (KS / 2) * 8 : 0;  // one stage of metadata
  static constexpr int STAGE_U4 = X_U4 + V_U4 + M_U4;
  static constexpr int ACC = MT * NTOK / 2;   // fp32 accumulators per thread
  // One-warpgroup blocks with few accumulators run two an SM.
  static constexpr int MINB = (WG == 1 && ACC <= 64) ? 2 : 1;
  static constexpr int BUDGET = (MINB == 2 ? 110 : 220) * 1024;
  static constexpr int STAGES_FIT = BUDGET / (STAGE_U4 * 16);
  static constexpr int STAGES = STAGES_FIT > 8 ? 8 : STAGES_FIT;
  static constexpr int SMEM = STAGES * STAGE_U4 * 16;
  static_assert(STAGES >= 3, "a 3-stage token ring of this configuration does not fit in shared memory");
  static_assert(KS % 2 == 0, "metadata comes in pairs of K-steps");
  static_assert(NTOK % 8 == 0 && NTOK >= 8 && NTOK <= 256, "wgmma N: a multiple of 8 up to 256");
};

template <int MT, int KS>
struct WgsRegs {
  uint4 a[MT][KS];
  uint32_t e[MT][KS / 2];
};

// The compiler does not know that a wgmma reads its register operands (and writes its
// accumulators) after the instruction issues: an empty asm that "modifies" a register keeps
// its value where it is until that point, so nothing else is put in it while a wgmma may
// still read it, and no accumulator is read before the wait that completes it.
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
template <int MT, int KS>
__device__ __forceinline__ void fence_regs(WgsRegs<MT, KS>& r) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      fence_reg(r.a[m][kk].x);
      fence_reg(r.a[m][kk].y);
      fence_reg(r.a[m][kk].z);
      fence_reg(r.a[m][kk].w);
    }
#pragma unroll
    for (int kp = 0; kp < KS / 2; ++kp) fence_reg(r.e[m][kp]);
  }
}

template <typename E, int MT, int NTOK, int KS, int WG, int WS>
__global__ void __launch_bounds__(WG * 128, (WgsShape<MT, NTOK, KS, WG, WS>::MINB)) nm24_wgs_kernel(Params p) {
#if DASS24_HAS_WGMMA
  using S = WgsShape<MT, NTOK, KS, WG, WS>;
  constexpr int STAGES = S::STAGES;
  constexpr int PRE = STAGES - 2;  // token stages in flight ahead of the one computed
  extern __shared__ uint4 smem[];

  const int tid = threadIdx.x, lane = tid & 31;
  const int wgi = tid >> 7, w = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const int ntile = p.N / 16;
  const int tile0 = blockIdx.x * S::TILES + wgi * 4 * MT + w;  // this warp's tile of m64 tile 0
  const int ksteps = p.K / 32;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int s_end = min(ksteps, s_begin + p.steps_per_split);
  const int nstage = (s_end - s_begin) / KS;
  const E* __restrict__ X = reinterpret_cast<const E*>(p.x);

  const uint4* __restrict__ M4 = reinterpret_cast<const uint4*>(p.meta);
  const int btile0 = blockIdx.x * S::TILES;
  auto load_x = [&](int st) {
    if (st < nstage) {
      uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
      const int s0 = s_begin + st * KS;
      const int kcol0 = s0 * 32;
      if constexpr (WS) {
        // a tile's KS K-steps of values are KS * 512 contiguous bytes, its metadata KS * 64
        uint4* vs = xs + S::X_U4;
        uint4* ms = vs + S::V_U4;
#pragma unroll
        for (int i = tid; i < S::V_U4; i += S::THREADS) {
          const int j = i / (KS * 32), o = i % (KS * 32);
          const bool ok = btile0 + j < ntile;
          cp_async16(vs + i, ok ? p.vals + ((size_t)(btile0 + j) * ksteps + s0) * 32 + o : p.vals, ok);
        }
#pragma unroll
        for (int i = tid; i < S::M_U4; i += S::THREADS) {
          const int j = i / (KS * 4), o = i % (KS * 4);
          const bool ok = btile0 + j < ntile;
          cp_async16(ms + i, ok ? M4 + ((size_t)(btile0 + j) * (ksteps / 2) + s0 / 2) * 8 + o : M4, ok);
        }
      }
      // lane -> (token lane % 8, chunk lane / 8 % 4): 4 lanes read 64 contiguous bytes of a
      // row, 8 lanes of one chunk write one 128-byte core matrix
#pragma unroll
      for (int i = tid; i < S::X_U4; i += S::THREADS) {
        const int r_lo = i & 7, c_lo = (i >> 3) & 3, rest = i >> 5;
        const int row = (rest % (NTOK / 8)) * 8 + r_lo;
        const int ch = (rest / (NTOK / 8)) * 4 + c_lo;
        const bool ok = row < p.T;
        cp_async16(xs + ch * NTOK + row, ok ? X + (size_t)row * p.K + kcol0 + ch * 8 : X, ok);
      }
    }
    cp_async_commit();
  };

  // weight loads: tile m of this warp is 4 m tiles past tile0; tiles past the matrix are
  // not loaded (their rows are never written)
  const uint4* wsrc = p.vals + ((size_t)tile0 * ksteps + s_begin) * 32 + lane;
  const uint32_t* msrc = p.meta + ((size_t)tile0 * (ksteps / 2) + s_begin / 2) * 32 + lane;
  const size_t wtile = (size_t)4 * ksteps * 32;        // uint4 between this warp's tiles m, m + 1
  const size_t mtile = (size_t)4 * (ksteps / 2) * 32;  // metadata words between them
  auto load_w = [&](WgsRegs<MT, KS>& r, int st) {
    if constexpr (WS) return;  // read from the ring in compute
    if (st >= nstage) return;
    const uint4* ws = wsrc + st * (KS * 32);
    const uint32_t* ms = msrc + st * (KS / 2) * 32;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (tile0 + 4 * m >= ntile) break;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) r.a[m][kk] = ldg_stream(ws + m * wtile + kk * 32);
#pragma unroll
      for (int kp = 0; kp < KS / 2; ++kp) r.e[m][kp] = ldg_stream(ms + m * mtile + kp * 32);
    }
  };

  float acc[MT][NTOK / 2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < NTOK / 2; ++c) acc[m][c] = 0.f;

  const uint32_t lbo = p.wg_swap ? 128u : (uint32_t)NTOK * 16u;
  const uint32_t sbo = p.wg_swap ? (uint32_t)NTOK * 16u : 128u;
  auto fence_acc = [&]() {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < NTOK / 2; ++c) fence_reg(acc[m][c]);
  };
  auto compute = [&](WgsRegs<MT, KS>& r, int st) {
    const uint4* xs = smem + (st % STAGES) * S::STAGE_U4;
    if constexpr (WS) {
      const uint4* vs = xs + S::X_U4;
      const uint32_t* ms = reinterpret_cast<const uint32_t*>(vs + S::V_U4);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int j = (wgi * MT + m) * 4 + w;  // this warp's tile m within the block
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) r.a[m][kk] = lds128(vs + (j * KS + kk) * 32 + lane);
#pragma unroll
        for (int kp = 0; kp < KS / 2; ++kp) r.e[m][kp] = lds32(ms + (j * (KS / 2) + kp) * 32 + lane);
      }
    }
    fence_regs(r);
    fence_acc();
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const uint64_t d = wg_desc(xs + kk * 4 * NTOK, lbo, sbo);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (kk % 2 == 0)
          wgmma_sp_rs<E, NTOK>(acc[m], r.a[m][kk], r.e[m][kk / 2], d, SelTag<0>{});
        else
          wgmma_sp_rs<E, NTOK>(acc[m], r.a[m][kk], r.e[m][kk / 2], d, SelTag<1>{});
      }
    }
    wgmma_commit();
    fence_acc();
  };

  WgsRegs<MT, KS> ra, rb;
#pragma unroll
  for (int m = 0; m < MT; ++m) {  // registers of absent tiles still feed the (discarded) rows
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) ra.a[m][kk] = rb.a[m][kk] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int kp = 0; kp < KS / 2; ++kp) ra.e[m][kp] = rb.e[m][kp] = 0u;
  }
#pragma unroll
  for (int st = 0; st < PRE; ++st) load_x(st);
  load_w(ra, 0);
#pragma unroll 1
  for (int st = 0; st < nstage; st += 2) {
    cp_async_wait<PRE - 1>();
    fence_proxy_async();  // this thread's copies, visible to the tensor cores' reads
    __syncthreads();      // everyone's copies landed; slot (st - 2) % STAGES is no longer read
    load_x(st + PRE);
    compute(ra, st);
    wgmma_wait<1>();  // stage st - 1's wgmmas (which read rb) are done
    fence_regs(rb);
    load_w(rb, st + 1);
    if (st + 1 >= nstage) break;
    cp_async_wait<PRE - 1>();
    fence_proxy_async();
    __syncthreads();
    load_x(st + 1 + PRE);
    compute(rb, st + 1);
    wgmma_wait<1>();  // stage st's wgmmas (which read ra) are done
    fence_regs(ra);
    load_w(ra, st + 2);
  }
  wgmma_wait<0>();
  fence_regs(ra);
  fence_regs(rb);
  fence_acc();
  cp_async_wait<0>();

  // acc[m][4n + c]: row g (c < 2) or g + 8 (c >= 2) of this warp's 16-row tile, token
  // 8n + 2t + c % 2
  const bool split = gridDim.y > 1;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tt = tile0 + 4 * m;
    if (tt >= ntile) continue;
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int row = tt * 16 + g + 8 * hi;
      const float bv = (!split && p.bias) ? Mma<E>::to_f(p.bias, row) : 0.f;
#pragma unroll
      for (int n = 0; n < NTOK / 8; ++n) {
#pragma unroll
        for (int c2 = 0; c2 < 2; ++c2) {
          const int tok = n * 8 + 2 * t + c2;
          if (tok >= p.T) continue;
          const float v = acc[m][4 * n + 2 * hi + c2];
          if (split)
            atomicAdd(p.ws + (size_t)tok * p.N + row, v);
          else
            reinterpret_cast<uint16_t*>(p.y)[(size_t)tok * p.N + row] = Mma<E>::from_f(v + bv);
        }
      }
    }
  }
#else
  __trap();  // built for a GPU without wgmma: the host refuses before launching
#endif
}

template <typename E, int MT, int NTOK, int KS, int WG, int WS>
cudaError_t launch_wgs(const Params& p, int splits, cudaStream_t stream) {
  using S = WgsShape<MT, NTOK, KS, WG, WS>;
  auto kern = nm24_wgs_kernel<E, MT, NTOK, KS, WG, WS>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM);
  if (err != cudaSuccess) return err;
  dim3 grid((p.N / 16 + S::TILES - 1) / S::TILES, splits);
  kern<<<grid, S::THREADS, S::SMEM, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dass24
