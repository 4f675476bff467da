// The dense matrix from the packed layout (dass/infer/cuda/layout.py), on the GPU: what the
// "decompress" path multiplies with cuBLAS past 128 tokens, so a module needs no second
// compressed copy of its weight. Works on 16-bit patterns (any 16-bit dtype), writes every
// element once (pruned places as +0), one thread per lane fragment of the layout; it mirrors
// layout.unpack, and benchmarks/gpu_kernels.py checks the two agree bit for bit.
#include <cuda_runtime.h>
#include <stdint.h>

namespace dass24 {

__global__ void unpack_in_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta,
                                 uint16_t* __restrict__ out, int N, int K) {
  const int S = K / 32;
  const long total = (long)(N / 16) * S * 32;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int lane = (int)(i & 31), s = (int)((i >> 5) % S), rt = (int)((i >> 5) / S);
  const int g = lane >> 2, t = lane & 3;
  const uint4 v = vals[i];
  const uint32_t* mw = meta + ((long)rt * (S / 2) + s / 2) * 32 + 4 * g + 2 * (s & 1);
  const uint32_t w[2] = {mw[0], mw[1]};  // q = 0: groups 0-3, q = 1: groups 4-7
  const uint32_t r[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // register k: row g (+8 if k odd), group t (+4 if k >= 2)
    const int upper = k & 1, q = k >> 1;
    const uint32_t code = (w[q] >> (16 * upper + 4 * t)) & 15u;
    const uint32_t i0 = code & 3u, i1 = code >> 2;
    const uint32_t lo = r[k] & 0xFFFFu, hi = r[k] >> 16;
    uint16_t e[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = (uint16_t)(i0 == (uint32_t)j ? lo : (i1 == (uint32_t)j ? hi : 0u));
    const int row = rt * 16 + g + 8 * upper;
    const int col = s * 32 + (t + 4 * q) * 4;
    uint2 o;
    o.x = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    o.y = (uint32_t)e[2] | ((uint32_t)e[3] << 16);
    *reinterpret_cast<uint2*>(out + (long)row * K + col) = o;
  }
}

__global__ void unpack_out_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta,
                                  uint16_t* __restrict__ out, int N, int K) {
  const int S = K / 32;
  const long total = (long)(N / 32) * S * 2 * 32;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int lane = (int)(i & 31), h = (int)((i >> 5) & 1);
  const long ts = i >> 6;  // rt * S + s
  const int s = (int)(ts % S), rt = (int)(ts / S);
  const int g = lane >> 2, t = lane & 3;
  const uint4 v = vals[i];
  const uint32_t m = meta[ts * 32 + lane] >> (16 * h);
#pragma unroll
  for (int pr = 0; pr < 2; ++pr) {  // column pairs (2t, 2t+1) and (2t+8, 2t+9) of the half
    const uint32_t P0 = pr ? v.z : v.x, P1 = pr ? v.w : v.y;
    const uint32_t ca = (m >> (8 * pr)) & 15u, cb = (m >> (8 * pr + 4)) & 15u;
    const int col = s * 32 + 16 * h + 2 * t + 8 * pr;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t a = (ca & 3u) == (uint32_t)q ? (P0 & 0xFFFFu) : ((ca >> 2) == (uint32_t)q ? (P1 & 0xFFFFu) : 0u);
      const uint32_t b = (cb & 3u) == (uint32_t)q ? (P0 >> 16) : ((cb >> 2) == (uint32_t)q ? (P1 >> 16) : 0u);
      *reinterpret_cast<uint32_t*>(out + (long)(rt * 32 + 4 * g + q) * K + col) = a | (b << 16);
    }
  }
}

// The output orientation with coalesced stores: a lane's fragment holds 4 rows x 4 columns
// scattered over the tile, so written straight out every store covers half a 32-byte sector.
// Here a block of 256 threads expands 4 consecutive K-steps of one 32-row tile (32 rows x 128
// columns) into shared memory, then writes each row as 256 contiguous bytes (16 lanes of
// 16 bytes). Row stride 65 words: the 8 fragment rows a store instruction touches land 4
// banks apart. Needs K % 128 == 0 (the host falls back to unpack_out_kernel otherwise).
constexpr int kUnpackStride = 65;  // words (32-bit) per row of the staging tile

__global__ void __launch_bounds__(256) unpack_out_coalesced_kernel(const uint4* __restrict__ vals,
                                                                    const uint32_t* __restrict__ meta,
                                                                    uint16_t* __restrict__ out, int N, int K) {
  __shared__ uint32_t tile[32 * kUnpackStride];
  const int S = K / 32;
  const int groups = S / 4;  // blocks per 32-row tile
  const int rt = blockIdx.x / groups, s0 = (blockIdx.x % groups) * 4;
  const int i = threadIdx.x;
  const int lane = i & 31, h = (i >> 5) & 1, sl = i >> 6;
  const int g = lane >> 2, t = lane & 3;
  const long ts = (long)rt * S + s0 + sl;
  const uint4 v = vals[(ts * 2 + h) * 32 + lane];
  const uint32_t m = meta[ts * 32 + lane] >> (16 * h);
#pragma unroll
  for (int pr = 0; pr < 2; ++pr) {
    const uint32_t P0 = pr ? v.z : v.x, P1 = pr ? v.w : v.y;
    const uint32_t ca = (m >> (8 * pr)) & 15u, cb = (m >> (8 * pr + 4)) & 15u;
    const int word = (sl * 32 + 16 * h + 2 * t + 8 * pr) / 2;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t a = (ca & 3u) == (uint32_t)q ? (P0 & 0xFFFFu) : ((ca >> 2) == (uint32_t)q ? (P1 & 0xFFFFu) : 0u);
      const uint32_t b = (cb & 3u) == (uint32_t)q ? (P0 >> 16) : ((cb >> 2) == (uint32_t)q ? (P1 >> 16) : 0u);
      tile[(4 * g + q) * kUnpackStride + word] = a | (b << 16);
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = i + 256 * k;  // 16-byte chunk: row c / 16, words 4 (c % 16) ..
    const int row = c >> 4, cw = (c & 15) * 4;
    const uint32_t* src = tile + row * kUnpackStride + cw;
    const uint4 o = make_uint4(src[0], src[1], src[2], src[3]);
    *reinterpret_cast<uint4*>(out + (long)(rt * 32 + row) * K + s0 * 32 + cw * 2) = o;
  }
}

cudaError_t unpack(const void* vals, const void* meta, void* out, int N, int K, int orientation, cudaStream_t s) {
  if (orientation == 1 && K % 128 == 0) {
    const unsigned blocks = (unsigned)((N / 32) * (K / 128));
    unpack_out_coalesced_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<const uint4*>(vals),
                                                       reinterpret_cast<const uint32_t*>(meta),
                                                       reinterpret_cast<uint16_t*>(out), N, K);
    return cudaGetLastError();
  }
  const long total = orientation == 0 ? (long)(N / 16) * (K / 32) * 32 : (long)(N / 32) * (K / 32) * 64;
  const int threads = 256;
  const unsigned blocks = (unsigned)((total + threads - 1) / threads);
  if (orientation == 0)
    unpack_in_kernel<<<blocks, threads, 0, s>>>(reinterpret_cast<const uint4*>(vals),
                                                reinterpret_cast<const uint32_t*>(meta),
                                                reinterpret_cast<uint16_t*>(out), N, K);
  else
    unpack_out_kernel<<<blocks, threads, 0, s>>>(reinterpret_cast<const uint4*>(vals),
                                                 reinterpret_cast<const uint32_t*>(meta),
                                                 reinterpret_cast<uint16_t*>(out), N, K);
  return cudaGetLastError();
}

}  // namespace dass24
