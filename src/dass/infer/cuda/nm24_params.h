// Arguments of one 2:4 product, shared by the CUDA units and the C++ binding.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace dass24 {

struct Params {
  const uint4* vals;     // packed values (dass/infer/cuda/layout.py)
  const uint32_t* meta;  // packed metadata
  const void* x;         // [T, K] 16-bit, contiguous
  void* y;               // [T, N] 16-bit (written directly when there is one split)
  float* ws;             // split-K fp32 workspace: partials by slice (register and shared-memory
                         // kernels) or a zeroed [T, N] for atomics (sparse-wgmma kernel)
  const void* bias;      // [N] 16-bit or nullptr
  int* counters;         // split-K arrival counters, one a row block (zero between calls)
  int N, K, T;
  int steps_per_split;   // K-steps of 32 per grid.y slice (a multiple of KS)
  int wg_swap;           // wgmma kernel: 1 swaps the descriptor's two byte offsets (a GPU probe)
  int act;               // GLU register kernel: 0 silu, 1 gelu (tanh); y is then [T, N / 2]
  int pdl;               // register kernel: 1 launches with programmatic stream serialization
};

cudaError_t run_in_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_in_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_out_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_out_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
// The register kernel on a stacked [gate; up] matrix, writing act(gate) * up (nm24_kernels.cuh, GLU).
cudaError_t run_glu_in_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_glu_in_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_glu_out_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_glu_out_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
// The register kernel's deep variant for 57-128 tokens (5-stage token ring, L2 prefetch of the
// weights 4 stages ahead; nm24_kernels.cuh PF, DEEP_CONFIGS).
cudaError_t run_deep_in_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_deep_in_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_deep_out_bf16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
cudaError_t run_deep_out_f16(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s);
// The shared-memory kernel (nm24_smem.cuh): wn = warps along the tokens (8 / wn along rows).
cudaError_t run_smem_in_bf16(int mt, int wn, int nt, int ks, const Params& p, int splits, cudaStream_t s);
cudaError_t run_smem_in_f16(int mt, int wn, int nt, int ks, const Params& p, int splits, cudaStream_t s);
cudaError_t run_smem_out_bf16(int mt, int wn, int nt, int ks, const Params& p, int splits, cudaStream_t s);
cudaError_t run_smem_out_f16(int mt, int wn, int nt, int ks, const Params& p, int splits, cudaStream_t s);
// The wgmma kernel (nm24_wg.cuh, output orientation, sm_90a only).
cudaError_t run_wg_out_bf16(int mt, int wg, int ts, int nt, int ks, const Params& p, int splits, cudaStream_t s);
cudaError_t run_wg_out_f16(int mt, int wg, int ts, int nt, int ks, const Params& p, int splits, cudaStream_t s);
// The sparse-wgmma kernel (nm24_wgs.cuh, input orientation, sm_90a only).
cudaError_t run_wgs_in_bf16(int mt, int wg, int nt, int ks, int ws, const Params& p, int splits, cudaStream_t s);
cudaError_t run_wgs_in_f16(int mt, int wg, int nt, int ks, int ws, const Params& p, int splits, cudaStream_t s);
// The dense matrix (16-bit patterns) from the packed layout (nm24_unpack.cu).
cudaError_t unpack(const void* vals, const void* meta, void* out, int N, int K, int orientation, cudaStream_t s);
cudaError_t finish_bf16(const float* ws, const void* bias, void* y, int N, long total, cudaStream_t s);
cudaError_t finish_f16(const float* ws, const void* bias, void* y, int N, long total, cudaStream_t s);

}  // namespace dass24
