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
// Split-K (grid.y > 1) accumulates fp32 partials with atomics into a zeroed workspace and a
// second kernel converts (and adds the bias); with one split the epilogue writes directly.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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
};

// Expand one 16-K half of an output-orientation step into the A fragments of the two m16
// tiles (rows q = 0,1 -> tile a; q = 2,3 -> tile b). For a column pair (A, B) the lane has
// P0 = v0[A] | v0[B] << 16, P1 = v1[A] | v1[B] << 16 and two 4-bit codes i0 | i1 << 2; row
// q takes v0 where i0 == q, v1 where i1 == q, else 0. The 0/0xFFFF masks come from one byte
// permute of a constant with a 0xFF byte at q, indexed by i0 (or i1) twice per half.
__device__ __forceinline__ void expand_half(const uint4& v, uint32_t m, uint32_t (&fa)[4], uint32_t (&fb)[4]) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const uint32_t P0 = p ? v.z : v.x;
    const uint32_t P1 = p ? v.w : v.y;
    const uint32_t nib = (m >> (8 * p)) & 0xFFu;  // code of A in bits 0-3, B in bits 4-7
    const uint32_t iA0 = nib & 3u, iA1 = (nib >> 2) & 3u, iB0 = (nib >> 4) & 3u, iB1 = (nib >> 6) & 3u;
    const uint32_t s0 = iA0 * 0x0011u | iB0 * 0x1100u;
    const uint32_t s1 = iA1 * 0x0011u | iB1 * 0x1100u;
    uint32_t r[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t table = 0xFFu << (8 * q);
      const uint32_t m0 = __byte_perm(table, 0u, s0);
      const uint32_t m1 = __byte_perm(table, 0u, s1);
      r[q] = (P0 & m0) | (P1 & m1);
    }
    fa[2 * p + 0] = r[0];
    fa[2 * p + 1] = r[1];
    fb[2 * p + 0] = r[2];
    fb[2 * p + 1] = r[3];
  }
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
template <typename E, int ORI, int MT, int NT, int KS, int WR, int WT, int STAGES>
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

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntile = p.N / ROWS;
  const int tile0 = (blockIdx.x * WR + warp % WR) * MT;
  const int tok0 = (warp / WR) * NT * 8;  // this warp's first token
  const int ksteps = p.K / 32;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int s_end = min(ksteps, s_begin + p.steps_per_split);
  const int nstage = (s_end - s_begin) / KS;
  const E* __restrict__ X = reinterpret_cast<const E*>(p.x);

  auto load_x = [&](int st) {
    if (st < nstage) {
      uint4* dst = smem + (st % STAGES) * STAGE_U4;
      const int kcol0 = (s_begin + st * KS) * 32;
#pragma unroll 1
      for (int i = threadIdx.x; i < STAGE_U4; i += WARPS * 32) {
        const int row = i / CH, ch = i % CH;
        const bool ok = row < p.T;
        const E* src = ok ? X + (size_t)row * p.K + kcol0 + ch * 8 : X;
        cp_async16(dst + row * CH + (ch ^ (row & 7)), src, ok);
      }
    }
    cp_async_commit();
  };

  auto load_w = [&](WeightRegs<ORI, MT, KS>& r, int st) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int tt = tile0 + m;
      const bool ok = tt < ntile && st < nstage;
      const int s0 = s_begin + st * KS;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        if constexpr (ORI == 0) {
          const uint4* src = p.vals + ((size_t)tt * ksteps + s0 + kk) * 32 + lane;
          auto& dst = r.a[m][kk];
          dst = ok ? ldg_w<SHARED_W>(src) : make_uint4(0, 0, 0, 0);
        } else {
          const uint4* src = p.vals + (((size_t)tt * ksteps + s0 + kk) * 2) * 32 + lane;
          auto& dst = r;
          dst.a[m][kk][0] = ok ? ldg_w<SHARED_W>(src) : make_uint4(0, 0, 0, 0);
          dst.a[m][kk][1] = ok ? ldg_w<SHARED_W>(src + 32) : make_uint4(0, 0, 0, 0);
          dst.e[m][kk] = ok ? ldg_w<SHARED_W>(p.meta + ((size_t)tt * ksteps + s0 + kk) * 32 + lane) : 0u;
        }
      }
      if constexpr (ORI == 0) {
#pragma unroll
        for (int kp = 0; kp < KS / 2; ++kp) {
          const uint32_t* src = p.meta + ((size_t)tt * (ksteps / 2) + s0 / 2 + kp) * 32 + lane;
          r.e[m][kp] = ok ? ldg_w<SHARED_W>(src) : 0u;
        }
      }
    }
  };

  float acc[MT][NF][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][f][nt][c] = 0.f;

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
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) load_x(st);
  load_w(ra, 0);
#pragma unroll 1
  for (int st = 0; st < nstage; st += 2) {
    load_w(rb, st + 1);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_x(st + STAGES - 1);
    compute(ra, st);
    if (st + 1 >= nstage) break;
    load_w(ra, st + 2);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_x(st + STAGES);
    compute(rb, st + 1);
  }
  cp_async_wait<0>();

  const bool split = gridDim.y > 1;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tt = tile0 + m;
    if (tt >= ntile) continue;
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
            float v = acc[m][0][nt][2 * hi + c2];
            if (split) {
              atomicAdd(p.ws + (size_t)tok * p.N + row, v);
            } else {
              if (p.bias) v += Mma<E>::to_f(p.bias, row);
              reinterpret_cast<uint16_t*>(p.y)[(size_t)tok * p.N + row] = Mma<E>::from_f(v);
            }
          }
        } else {
          const int row0 = tt * 32 + 4 * g;  // rows 4g + q, q = 0..3 (tile a: q 0,1; b: q 2,3)
          float v[4] = {acc[m][0][nt][c2], acc[m][0][nt][2 + c2], acc[m][1][nt][c2], acc[m][1][nt][2 + c2]};
          if (split) {
#pragma unroll
            for (int q = 0; q < 4; ++q) atomicAdd(p.ws + (size_t)tok * p.N + row0 + q, v[q]);
          } else {
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

// nt: token tiles of 8 of the whole block (WT * a warp's).
template <typename E, int ORI, int MT, int NT, int KS, int WT>
constexpr int smem_bytes() {
  return kStages * NT * 8 * KS * 4 * 16;
}

// Host-side launch of one instantiation (NT: the block's token tiles); returns a cudaError_t.
template <typename E, int ORI, int MT, int NT, int KS, int WR, int WT>
cudaError_t launch(const Params& p, int splits, cudaStream_t stream) {
  static_assert(NT % WT == 0, "whole token tiles a warp");
  auto kern = nm24_kernel<E, ORI, MT, NT / WT, KS, WR, WT, kStages>;
  constexpr int smem = smem_bytes<E, ORI, MT, NT, KS, WT>();
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  constexpr int ROWS = ORI == 0 ? 16 : 32;
  const int ntile = p.N / ROWS;
  dim3 grid((ntile + WR * MT - 1) / (WR * MT), splits);
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
