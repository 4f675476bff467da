// 2:4 sparse x dense products for 1-128 tokens, y[T, N] = x[T, K] @ W[N, K]^T.
//
// The weight is streamed once from global memory straight into tensor-core fragments: the
// packed layouts (dass/infer/cuda/layout.py) store each warp's bytes in lane order, so a
// step is one coalesced 512-byte load of values (16 bytes a lane) plus metadata. The
// tokens (small: T x K) go through shared memory in a cp.async ring of STAGES stages and
// reach the tensor cores through ldmatrix. Weight registers are double-buffered: the next
// stage's loads are issued before this stage's arithmetic.
//
// ORI 0 (input orientation): mma.sp.m16n8k32, the weight as the sparse operand A.
// ORI 1 (output orientation): each lane expands its own 2:4 groups (it holds all 4 rows of
// a group, see layout.py) into dense mma.m16n8k16 fragments with byte permutes and masks.
//
// Split-K (grid.y > 1) is finished inside the kernel: every slice stores its fp32 partial
// accumulators to a workspace in fragment order (each thread its own registers, one 16-byte
// store per fragment, so the stores are coalesced and no workspace needs zeroing), then counts
// itself in on its row block's arrival counter; the slice that arrives last adds up all the
// slices' partials in slice order and runs the one-split epilogue (bias, 16-bit store),
// and puts the counter back to zero for the next call. One launch per product: no zero fill
// of a workspace before it and no conversion kernel after it, which at decode sizes cost as
// much GPU time as the product's own tail.
//
// GLU (a stacked [gate; up] matrix, N = 2 D): a warp's MT tiles are MT / 2 gate tiles and the
// up tiles of the same rows (D / ROWS tiles further on), so every thread holds the gate and
// up accumulators of the same rows and tokens; the epilogue writes h = act(g) * u, [T, D].
// One kernel fewer a GLU MLP, and the down product that follows can start on its weights at
// once (programmatic dependent launch, below).
//
// Programmatic dependent launch (Params::pdl, compute capability 9.0): launched with
// programmatic stream serialization, a product starts while the kernel before it finishes.
// Nothing that kernel writes is touched before griddepcontrol.wait: before it a block only
// issues its first weight loads and L2 prefetches of the next ones (the weights are never
// written by anyone). A block lets the next kernel launch (griddepcontrol.launch_dependents)
// once its main loop is done, so a dependent never takes an SM slot before all of this
// grid's blocks have one. Without the launch attribute both instructions do nothing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cstdlib>

#include "nm24_params.h"

namespace dass24 {

// Params: nm24_params.h

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Two 8x8 matrices: lanes 0-7 address the first, 8-15 the second (16-31 are ignored).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Weight loads of a block whose token groups (WT > 1) read the same rows: through L1, so the
// second warp of a row group finds the bytes there instead of in L2.
__device__ __forceinline__ uint4 ldg_shared(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldg_shared(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldg_stream(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
// Programmatic dependent launch (no-ops below compute capability 9.0 and without the attribute)
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// The GLU activations (Params::act): 0 silu, 1 gelu with the tanh approximation, both as
// g * sigmoid(.) like dass.infer.kernels.glu (gelu_tanh: 0.5 g (1 + tanh z) = g sigmoid(2 z)).
__device__ __forceinline__ float glu_act(int act, float g) {
  const float z = act == 0 ? g : 1.5957691216057308f * (g + 0.044715f * g * g * g);
  return g / (1.f + __expf(-z));
}

template <bool SHARED, typename P>
__device__ __forceinline__ auto ldg_w(const P* p) {
  if constexpr (SHARED) return ldg_shared(p);
  else return ldg_stream(p);
}

template <typename E> struct Mma;

template <> struct Mma<__nv_bfloat16> {
  template <int SEL>
  __device__ __forceinline__ static void sp(float (&c)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  }
  __device__ __forceinline__ static void dense(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static float to_f(const void* p, int i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
  }
  __device__ __forceinline__ static uint16_t from_f(float v) {
    __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ __forceinline__ static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

template <> struct Mma<__half> {
  template <int SEL>
  __device__ __forceinline__ static void sp(float (&c)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  }
  __device__ __forceinline__ static void dense(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static float to_f(const void* p, int i) {
    return __half2float(reinterpret_cast<const __half*>(p)[i]);
  }
  __device__ __forceinline__ static uint16_t from_f(float v) {
    __half h = __float2half_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ __forceinline__ static float round(float v) { return __half2float(__float2half_rn(v)); }
};

// Expand one 16-K half of an output-orientation step into the A fragments of the two m16
// tiles (rows q = 0,1 -> tile a; q = 2,3 -> tile b). The lane holds two column pairs p = 0,1
// (v.x, v.y for p = 0; v.z, v.w for p = 1), each word v0[A] | v0[B] << 16 (resp. v1), and for
// every column a code i0 | i1 << 2: row q takes v0 where i0 == q, v1 where i1 == q, else 0.
// The 16-bit halves are first regrouped so each word holds the same slot of both pairs
// (L = low halves, H = high halves); then one byte permute of a constant with a 0xFF byte at
// q, indexed by all four i0 (or i1) codes at once, gives the 0/0xFFFF masks for both pairs,
// and a final permute puts each row's values back into fragment order. This is about half
// the integer work of masking pair by pair, which dominated the output kernels' issue slots.
__device__ __forceinline__ void expand_half(const uint4& v, uint32_t m, uint32_t (&fa)[4], uint32_t (&fb)[4]) {
  const uint32_t L0 = __byte_perm(v.x, v.z, 0x6420), H0 = __byte_perm(v.x, v.z, 0x7531);
  const uint32_t L1 = __byte_perm(v.y, v.w, 0x6420), H1 = __byte_perm(v.y, v.w, 0x7531);
  const uint32_t s0 = m & 0x3333u, s1 = (m >> 2) & 0x3333u;
  uint32_t r0[4], r1[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t table = 0xFFu << (8 * q);
    const uint32_t m0 = __byte_perm(table, 0u, s0);
    const uint32_t m1 = __byte_perm(table, 0u, s1);
    const uint32_t rl = (L0 & m0) | (L1 & m1);
    const uint32_t rh = (H0 & m0) | (H1 & m1);
    r0[q] = __byte_perm(rl, rh, 0x5140);
    r1[q] = __byte_perm(rl, rh, 0x7362);
  }
  fa[0] = r0[0]; fa[1] = r0[1]; fa[2] = r1[0]; fa[3] = r1[1];
  fb[0] = r0[2]; fb[1] = r0[3]; fb[2] = r1[2]; fb[3] = r1[3];
}

template <int ORI, int MT, int KS> struct WeightRegs;
template <int MT, int KS> struct WeightRegs<0, MT, KS> {
  uint4 a[MT][KS];
  uint32_t e[MT][KS / 2];
};
template <int MT, int KS> struct WeightRegs<1, MT, KS> {
  uint4 a[MT][KS][2];
  uint32_t e[MT][KS];
};

// WR x WT warps a block: WR along the rows (MT tiles each), WT along the tokens (NT tiles of 8
// each). WT > 1 lets a warp's weight fragments meet more tokens per shared-memory read (the
// token fragments are reused MT-fold, not once) and a block's token tile serve more rows,
// at the price of each weight byte being loaded by WT warps (the first from DRAM, the
// others from L1/L2).
// PF > 0 (the deep variant, 57-128 tokens): each stage also prefetches into L2 the weight and
// metadata lines of the stage PF ahead, so the register loads one stage ahead hit L2 rather
// than wait on DRAM; with a deeper token ring (STAGES) beside it.
template <typename E, int ORI, int MT, int NT, int KS, int WR, int WT, int STAGES, bool GLU, int PF = 0>
__global__ void __launch_bounds__(WR * WT * 32) nm24_kernel(Params p) {
  extern __shared__ uint4 smem[];
  constexpr int WARPS = WR * WT;
  constexpr bool SHARED_W = WT > 1;
  constexpr int ROWS = ORI == 0 ? 16 : 32;  // matrix rows of one warp tile
  constexpr int TOK = WT * NT * 8;          // tokens of a block
  constexpr int CH = KS * 4;  // 16-byte chunks of a token row per stage (KS * 32 values)
  constexpr int STAGE_U4 = TOK * CH;
  constexpr int NF = ORI == 0 ? 1 : 2;  // m16 fragments per warp tile
  static_assert(CH % 8 == 0, "the shared-memory swizzle needs KS >= 2");
  static_assert(KS % 2 == 0, "metadata comes in pairs of K-steps");
  static_assert(!GLU || MT % 2 == 0, "GLU: half a warp's tiles are gate tiles, half up tiles");
  constexpr int MH = GLU ? MT / 2 : MT;  // a warp's tiles of output rows

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntile = p.N / ROWS;
  const int otile = GLU ? ntile / 2 : ntile;  // tiles of output rows (the gate tiles)
  const int tile0 = (blockIdx.x * WR + warp % WR) * MH;
  const int tok0 = (warp / WR) * NT * 8;  // this warp's first token
  const int ksteps = p.K / 32;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int s_end = min(ksteps, s_begin + p.steps_per_split);
  const int nstage = (s_end - s_begin) / KS;
  const E* __restrict__ X = reinterpret_cast<const E*>(p.x);

  // The token copies of a stage, strength-reduced once here: a thread's chunks of a stage are
  // XIT rows XSTEP apart in one 16-byte column (XSTEP is a multiple of 8, so the swizzle is
  // the same for all of them). Rows past T are not copied: their stale bytes only reach the
  // accumulators of tokens >= T, which are never written.
  constexpr int THREADS = WARPS * 32;
  constexpr int XSTEP = THREADS / CH;
  constexpr int XIT = (STAGE_U4 + THREADS - 1) / THREADS;
  static_assert(THREADS % CH == 0 && XSTEP % 8 == 0, "token copies: whole rows a pass, swizzle-aligned");
  const int xrow = threadIdx.x / CH, xch = threadIdx.x % CH;
  const E* xsrc = X + (size_t)xrow * p.K + s_begin * 32 + xch * 8;
  const size_t xstride = (size_t)XSTEP * p.K;
  const int xdst = xrow * CH + (xch ^ (xrow & 7));
  uint32_t xok = 0;
#pragma unroll
  for (int j = 0; j < XIT; ++j)
    xok |= (uint32_t)(xrow + j * XSTEP < p.T && (STAGE_U4 % THREADS == 0 || (int)threadIdx.x + j * THREADS < STAGE_U4)) << j;

  auto load_x = [&](int st) {
    if (st < nstage) {
      uint4* dst = smem + (st % STAGES) * STAGE_U4 + xdst;
      const E* src = xsrc + st * (KS * 32);
#pragma unroll
      for (int j = 0; j < XIT; ++j)
        if (xok >> j & 1) cp_async16(dst + j * XSTEP * CH, src + j * xstride, true);
    }
    cp_async_commit();
  };

  // The weight loads, strength-reduced too: one pointer a warp, row tiles ksteps steps apart.
  // Tiles past the matrix (the last block) and the stage after the last are not loaded:
  // their registers feed only rows that are never written, or no product at all.
  const int tclamp = otile - 1 - tile0;  // row tiles of this warp that exist: m % MH <= tclamp
  constexpr int VSTEP = ORI == 0 ? 32 : 64;  // uint4 of values a K-step and tile
  const uint4* wsrc = p.vals + ((size_t)tile0 * ksteps + s_begin) * VSTEP + lane;
  const uint32_t* msrc = ORI == 0 ? p.meta + ((size_t)tile0 * (ksteps / 2) + s_begin / 2) * 32 + lane
                                  : p.meta + ((size_t)tile0 * ksteps + s_begin) * 32 + lane;
  const size_t wtile = (size_t)ksteps * VSTEP;                      // values of one row tile
  const size_t mtile = (size_t)(ORI == 0 ? ksteps / 2 : ksteps) * 32;  // metadata of one row tile
  // GLU: tile m >= MH is the up tile of gate tile m - MH, otile - MH tiles further on
  const int ushift = GLU ? otile - MH : 0;
  auto tile_of = [&](int m) { return m + (GLU && m >= MH ? ushift : 0); };

  auto load_w = [&](WeightRegs<ORI, MT, KS>& r, int st) {
    if (st >= nstage) return;
    const uint4* ws = wsrc + st * (KS * VSTEP);
    const uint32_t* ms = msrc + st * (ORI == 0 ? KS / 2 : KS) * 32;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if constexpr (GLU) {
        if (m % MH > tclamp) continue;
      } else {
        if (m > tclamp) break;  // (break, not continue: 15-30 registers fewer in some shapes)
      }
      const uint4* wm = ws + tile_of(m) * wtile;
      const uint32_t* mm = ms + tile_of(m) * mtile;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        if constexpr (ORI == 0) {
          r.a[m][kk] = ldg_w<SHARED_W>(wm + kk * 32);
        } else {
          r.a[m][kk][0] = ldg_w<SHARED_W>(wm + kk * 64);
          r.a[m][kk][1] = ldg_w<SHARED_W>(wm + kk * 64 + 32);
          r.e[m][kk] = ldg_w<SHARED_W>(mm + kk * 32);
        }
      }
      if constexpr (ORI == 0) {
#pragma unroll
        for (int kp = 0; kp < KS / 2; ++kp) r.e[m][kp] = ldg_w<SHARED_W>(mm + kp * 32);
      }
    }
  };

  float acc[MT][NF][NT][4];
  // the accumulators as FR fragments of 4, fragment (m * NF + f) * NT + nt: the order of the
  // split-K partials' slots (compile-time indices after unrolling, so they stay in registers)
  constexpr int FR = MT * NF * NT;
  float* const frag = &acc[0][0][0][0];
  auto zero_acc = [&] {
#pragma unroll
    for (int i = 0; i < FR * 4; ++i) frag[i] = 0.f;
  };
  zero_acc();

  auto compute = [&](const WeightRegs<ORI, MT, KS>& r, int st) {
    const uint4* buf = smem + (st % STAGES) * STAGE_U4;
    const int mrow = lane & 7, mat = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if constexpr (ORI == 0) {
        const auto& w = r;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t b[4];
          const int row = tok0 + nt * 8 + mrow;
          ldmatrix_x4(b, buf + row * CH + ((kk * 4 + mat) ^ (row & 7)));
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (kk % 2 == 0)
              Mma<E>::template sp<0>(acc[m][0][nt], w.a[m][kk], b, w.e[m][kk / 2]);
            else
              Mma<E>::template sp<1>(acc[m][0][nt], w.a[m][kk], b, w.e[m][kk / 2]);
          }
        }
      } else {
        const auto& w = r;
        uint32_t fa[MT][2][4], fb[MT][2][4];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) expand_half(w.a[m][kk][h], w.e[m][kk] >> (16 * h), fa[m][h], fb[m][h]);
        // the two 16-K halves one after the other, each over every token tile: two products
        // into the same accumulator are 2 * NT * MT products apart, not adjacent (with one or
        // two warps a scheduler nothing else hides the tensor pipe's latency)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            uint32_t b[2];
            const int row = tok0 + nt * 8 + mrow;
            ldmatrix_x2(b, buf + row * CH + ((kk * 4 + 2 * h + (mat & 1)) ^ (row & 7)));
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              Mma<E>::dense(acc[m][0][nt], fa[m][h], b[0], b[1]);
              Mma<E>::dense(acc[m][1][nt], fb[m][h], b[0], b[1]);
            }
          }
      }
    }
  };

  WeightRegs<ORI, MT, KS> ra, rb;
  // Before the wait for the kernel ahead (PDL): the first stage's weights into registers and
  // (decode sizes, up to 64 tokens) up to 32 lines a tile of the next stages' into L2, lane l
  // fetching line l; at 128 tokens the registers are needed elsewhere
  load_w(ra, 0);
  if constexpr (NT * WT <= 8) {
    const int lines = min(32, (nstage - 1) * KS * VSTEP / 8);  // 128-byte lines past stage 0
    if (lane < lines) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m % MH <= tclamp) prefetch_l2(wsrc - lane + tile_of(m) * wtile + KS * VSTEP + lane * 8);
    }
  }
  // the deep variant's L2 prefetch of stage s: a tile's values of a stage are KS * VSTEP * 16
  // contiguous bytes (lane l takes line l), its metadata KS * 64 (input) or KS * 128 bytes
  auto prefetch_w = [&](int s) {
    if constexpr (PF > 0) {
      if (s >= nstage) return;
      constexpr int VLINES = KS * VSTEP / 8;          // 128-byte lines of values
      constexpr int MWORDS = (ORI == 0 ? KS / 2 : KS) * 32;  // metadata words
      constexpr int MLINES = MWORDS / 32;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m % MH > tclamp) continue;
#pragma unroll
        for (int l = lane; l < VLINES + MLINES; l += 32) {
          if (l < VLINES) prefetch_l2(wsrc - lane + tile_of(m) * wtile + (size_t)s * (KS * VSTEP) + l * 8);
          else prefetch_l2(msrc - lane + tile_of(m) * mtile + (size_t)s * MWORDS + (l - VLINES) * 32);
        }
      }
    }
  };
  grid_dep_wait();
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) load_x(st);
  if constexpr (PF > 0) {
#pragma unroll
    for (int s = 1; s < PF; ++s) prefetch_w(s);
  }
#pragma unroll 1
  for (int st = 0; st < nstage; st += 2) {
    load_w(rb, st + 1);
    prefetch_w(st + PF);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_x(st + STAGES - 1);
    compute(ra, st);
    if (st + 1 >= nstage) break;
    load_w(ra, st + 2);
    prefetch_w(st + 1 + PF);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_x(st + STAGES);
    compute(rb, st + 1);
  }
  cp_async_wait<0>();
  grid_dep_launch();

  if (gridDim.y > 1) {
    // this thread's partials: slot ((warp, m, f, nt), lane) of the slice's part of the block
    constexpr int PB = WARPS * FR * 32;  // float4 slots of one slice of a block
    float4* part = reinterpret_cast<float4*>(p.ws) + (size_t)blockIdx.x * gridDim.y * PB;
    const int slot0 = warp * FR * 32 + lane;
#pragma unroll
    for (int i = 0; i < FR; ++i)
      __stcg(part + (size_t)blockIdx.y * PB + slot0 + i * 32,
             make_float4(frag[4 * i], frag[4 * i + 1], frag[4 * i + 2], frag[4 * i + 3]));
    __threadfence();
    __syncthreads();
    // the flag goes in the (now idle) token ring: a static __shared__ would push the 48 KB
    // configurations past the default dynamic shared-memory limit and fail their launch
    volatile int* last = reinterpret_cast<volatile int*>(smem);
    if (threadIdx.x == 0) *last = atomicAdd(p.counters + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    // all the slices' partials, in slice order (its own too, read back): the sum does not
    // depend on which slice arrived last, so repeated calls give the same bits
    zero_acc();
    // UNR slices' loads are issued before their adds: at 1-8 tokens a block's partials are a
    // few registers a thread, and one slice at a time would put 8-16 L2 round trips in a row
    // on the tail of the product
    constexpr int UNR = FR >= 8 ? 1 : 8 / FR;
    const int S = (int)gridDim.y;
#pragma unroll 1
    for (int s0 = 0; s0 < S; s0 += UNR) {
      float4 v[UNR][FR];
#pragma unroll
      for (int u = 0; u < UNR; ++u)
#pragma unroll
        for (int i = 0; i < FR; ++i)
          v[u][i] = s0 + u < S ? __ldcg(part + (size_t)(s0 + u) * PB + slot0 + i * 32) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < UNR; ++u)
#pragma unroll
        for (int i = 0; i < FR; ++i) {
          frag[4 * i] += v[u][i].x;
          frag[4 * i + 1] += v[u][i].y;
          frag[4 * i + 2] += v[u][i].z;
          frag[4 * i + 3] += v[u][i].w;
        }
    }
    if (threadIdx.x == 0) p.counters[blockIdx.x] = 0;  // ready for the next call
  }

  // The epilogue: one 16-bit value a (fragment m / f, slot i) and output row; under GLU
  // act(g) * u with the up partner m + MH, g and u rounded to 16 bits first (as the unfused
  // path stores them), bias rows r and D + r
  const int OUTN = GLU ? otile * ROWS : p.N;  // columns of y: N, or D under GLU
  auto value = [&](int m, int f, int nt, int i, int row) -> uint16_t {
    float v = acc[m][f][nt][i];
    if (p.bias) v += Mma<E>::to_f(p.bias, row);
    if constexpr (!GLU) {
      return Mma<E>::from_f(v);
    } else {
      float u = acc[m + MH][f][nt][i];
      if (p.bias) u += Mma<E>::to_f(p.bias, OUTN + row);
      return Mma<E>::from_f(glu_act(p.act, Mma<E>::round(v)) * Mma<E>::round(u));
    }
  };
#pragma unroll
  for (int m = 0; m < MH; ++m) {
    const int tt = tile0 + m;
    if (tt >= otile) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const int tok = tok0 + nt * 8 + 2 * t + c2;
        if (tok >= p.T) continue;
        if constexpr (ORI == 0) {
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            const int row = tt * 16 + g + 8 * hi;
            reinterpret_cast<uint16_t*>(p.y)[(size_t)tok * OUTN + row] = value(m, 0, nt, 2 * hi + c2, row);
          }
        } else {
          // rows 4g + q, q = 0..3 (tile a: q 0,1 -> fragment 0; b: q 2,3 -> fragment 1)
          const int row0 = tt * 32 + 4 * g;
          uint16_t h[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) h[q] = value(m, q >> 1, nt, (q & 1) * 2 + c2, row0 + q);
          uint2 out;
          out.x = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
          out.y = (uint32_t)h[2] | ((uint32_t)h[3] << 16);
          *reinterpret_cast<uint2*>(reinterpret_cast<uint16_t*>(p.y) + (size_t)tok * OUTN + row0) = out;
        }
      }
    }
  }
}

// y = ws (+ bias), 16-bit: the end of a split-K product.
template <typename E>
__global__ void finish_kernel(const float* __restrict__ ws, const void* bias, void* y, int N, long total) {
  long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const long stride = (long)gridDim.x * blockDim.x;
  for (; i < total; i += stride) {
    float v = ws[i];
    if (bias) v += Mma<E>::to_f(bias, (int)(i % N));
    reinterpret_cast<uint16_t*>(y)[i] = Mma<E>::from_f(v);
  }
}

constexpr int kStages = 3;
// the deep variant (DEEP_CONFIGS): a 5-stage token ring and L2 prefetch 4 stages ahead
constexpr int kDeepStages = 5;
constexpr int kDeepPrefetch = 4;

// nt: token tiles of 8 of the whole block (WT * a warp's).
template <typename E, int ORI, int MT, int NT, int KS, int WT, int STG = kStages>
constexpr int smem_bytes() {
  return STG * NT * 8 * KS * 4 * 16;
}

// DASS_CUDA_CARVEOUT=n (0-100): the register kernel's preferred shared-memory carveout, in
// percent of the unified L1 / shared-memory capacity, set once an instantiation; unset, the
// driver chooses. An experiment (docs/speed.md, round 9): decoding steps with 2:4 products
// idle between kernels for about 6 us a layer more than dense ones, and an SM reconfiguring
// its carveout between neighbouring kernels of different shared-memory needs is one
// candidate cause.
inline int carveout_env() {
  static const int v = [] {
    const char* s = std::getenv("DASS_CUDA_CARVEOUT");
    return s && *s ? std::atoi(s) : -1;
  }();
  return v;
}

// Host-side launch of one instantiation (NT: the block's token tiles); returns a cudaError_t.
// GLU: p.N is the stacked matrix's rows (2 D); the grid covers the D output rows.
template <typename E, int ORI, int MT, int NT, int KS, int WR, int WT, bool GLU = false, bool DEEP = false>
cudaError_t launch(const Params& p, int splits, cudaStream_t stream) {
  static_assert(NT % WT == 0, "whole token tiles a warp");
  constexpr int STG = DEEP ? kDeepStages : kStages;
  auto kern = nm24_kernel<E, ORI, MT, NT / WT, KS, WR, WT, STG, GLU, DEEP ? kDeepPrefetch : 0>;
  constexpr int smem = smem_bytes<E, ORI, MT, NT, KS, WT, STG>();
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  static bool carved = false;  // once an instantiation (a benign race: the same value is set)
  if (!carved) {
    const int c = carveout_env();
    if (c >= 0) {
      cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, c < 100 ? c : 100);
      if (err != cudaSuccess) return err;
    }
    carved = true;
  }
  constexpr int ROWS = ORI == 0 ? 16 : 32;
  constexpr int MH = GLU ? MT / 2 : MT;
  const int otile = GLU ? p.N / ROWS / 2 : p.N / ROWS;
  dim3 grid((otile + WR * MH - 1) / (WR * MH), splits);
  if (p.pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(WR * WT * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kern, p);
  }
  kern<<<grid, WR * WT * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_finish(const float* ws, const void* bias, void* y, int N, long total, cudaStream_t stream) {
  int threads = 256;
  long blocks = (total + threads - 1) / threads;
  if (blocks > 4096) blocks = 4096;
  finish_kernel<E><<<(unsigned)blocks, threads, 0, stream>>>(ws, bias, y, N, total);
  return cudaGetLastError();
}

}  // namespace dass24
