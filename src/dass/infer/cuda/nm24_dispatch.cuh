// One (orientation, dtype) unit of instantiations: the switch from a run-time (MT, NT, KS)
// to a compiled kernel. Included by nm24_{in,out}_{bf16,f16}.cu with DASS24_E, DASS24_ORI,
// DASS24_RUN and DASS24_FINISH defined, so the four units compile in parallel.
//
// (MT, NT, KS, WR, WT): warp tiles a warp, the block's token tiles of 8, K-steps a stage,
// warps along the rows and along the tokens (nm24_kernels.cuh).
// The configurations listed here are the ones ptxas compiles without spilling on sm_90;
// dass/infer/cuda/__init__.py's CONFIGS must list the same (a CPU test compares them).
//
// With DASS24_GLU defined (nm24_glu_*.cu) the unit holds the GLU instantiations instead: the
// DASS24_GLU_CASE lists, which dass/infer/cuda/__init__.py's GLU_CONFIGS must equal. With
// DASS24_DEEP (nm24d_*.cu), the deep variant for 57-128 tokens (a 5-stage token ring and L2
// prefetch of the weights 4 stages ahead): the DASS24_DEEP_CASE lists = DEEP_CONFIGS.
#include "nm24_kernels.cuh"

namespace dass24 {

cudaError_t DASS24_RUN(int mt, int nt, int ks, int wr, int wt, const Params& p, int splits, cudaStream_t s) {
// one configuration of the unit's variant (GLU epilogue, deep variant); the lists below name
// their macro after the variant so that a CPU test can read each list
#define DASS24_LAUNCH_IF(MT, NT, KS, WR, WT, GLU, DEEP)           \
  if (mt == MT && nt == NT && ks == KS && wr == WR && wt == WT) \
    return launch<DASS24_E, DASS24_ORI, MT, NT, KS, WR, WT, GLU, DEEP>(p, splits, s);
#if defined(DASS24_DEEP)
#define DASS24_DEEP_CASE(MT, NT, KS, WR, WT) DASS24_LAUNCH_IF(MT, NT, KS, WR, WT, false, true)
#if DASS24_ORI == 0
  // DEEP_CONFIGS input
  DASS24_DEEP_CASE(2, 8, 2, 4, 1) DASS24_DEEP_CASE(2, 8, 4, 4, 1) DASS24_DEEP_CASE(2, 16, 2, 4, 1)
  DASS24_DEEP_CASE(1, 16, 2, 4, 1) DASS24_DEEP_CASE(1, 8, 4, 4, 1)
#else
  // DEEP_CONFIGS output
  DASS24_DEEP_CASE(1, 8, 4, 4, 1) DASS24_DEEP_CASE(1, 8, 2, 4, 1) DASS24_DEEP_CASE(1, 16, 2, 4, 1)
#endif
#undef DASS24_DEEP_CASE
  return cudaErrorInvalidValue;
#elif defined(DASS24_GLU)
#define DASS24_GLU_CASE(MT, NT, KS, WR, WT) DASS24_LAUNCH_IF(MT, NT, KS, WR, WT, true, false)
#if DASS24_ORI == 0
  // GLU_CONFIGS input
  DASS24_GLU_CASE(2, 1, 2, 4, 1) DASS24_GLU_CASE(2, 1, 4, 4, 1) DASS24_GLU_CASE(2, 2, 2, 4, 1)
  DASS24_GLU_CASE(2, 2, 4, 4, 1) DASS24_GLU_CASE(2, 4, 2, 4, 1) DASS24_GLU_CASE(2, 4, 4, 4, 1)
  DASS24_GLU_CASE(2, 8, 2, 4, 1) DASS24_GLU_CASE(2, 8, 4, 4, 1) DASS24_GLU_CASE(2, 16, 2, 4, 1)
  DASS24_GLU_CASE(2, 16, 2, 8, 1) DASS24_GLU_CASE(2, 8, 2, 8, 1)
#else
  // GLU_CONFIGS output
  DASS24_GLU_CASE(2, 1, 2, 4, 1) DASS24_GLU_CASE(2, 2, 2, 4, 1) DASS24_GLU_CASE(2, 4, 2, 4, 1)
#endif
#undef DASS24_GLU_CASE
  return cudaErrorInvalidValue;
#else
#define DASS24_CASE(MT, NT, KS, WR, WT) DASS24_LAUNCH_IF(MT, NT, KS, WR, WT, false, false)
#if DASS24_ORI == 0
  // CONFIGS input
  DASS24_CASE(1, 1, 2, 4, 1) DASS24_CASE(1, 1, 4, 4, 1) DASS24_CASE(2, 1, 2, 4, 1) DASS24_CASE(2, 1, 4, 4, 1)
  DASS24_CASE(1, 2, 2, 4, 1) DASS24_CASE(1, 2, 4, 4, 1) DASS24_CASE(2, 2, 2, 4, 1) DASS24_CASE(2, 2, 4, 4, 1)
  DASS24_CASE(1, 4, 2, 4, 1) DASS24_CASE(1, 4, 4, 4, 1) DASS24_CASE(2, 4, 2, 4, 1) DASS24_CASE(2, 4, 4, 4, 1)
  DASS24_CASE(1, 8, 2, 4, 1) DASS24_CASE(1, 8, 4, 4, 1) DASS24_CASE(2, 8, 2, 4, 1) DASS24_CASE(2, 8, 4, 4, 1)
  DASS24_CASE(1, 16, 2, 4, 1) DASS24_CASE(1, 16, 4, 4, 1) DASS24_CASE(2, 16, 2, 4, 1)
  // two token groups (WT = 2) and eight-warp blocks, for 32-128 tokens
  DASS24_CASE(2, 4, 2, 4, 2) DASS24_CASE(4, 4, 2, 4, 2)
  DASS24_CASE(2, 8, 2, 4, 2) DASS24_CASE(4, 8, 2, 4, 2) DASS24_CASE(4, 8, 2, 2, 2)
  DASS24_CASE(2, 16, 2, 4, 2) DASS24_CASE(4, 16, 2, 4, 2) DASS24_CASE(4, 16, 2, 2, 2)
  DASS24_CASE(2, 16, 2, 8, 1) DASS24_CASE(2, 8, 2, 8, 1)
#else
  // CONFIGS output
  DASS24_CASE(1, 1, 2, 4, 1) DASS24_CASE(1, 1, 4, 4, 1) DASS24_CASE(2, 1, 2, 4, 1)
  DASS24_CASE(1, 2, 2, 4, 1) DASS24_CASE(1, 2, 4, 4, 1) DASS24_CASE(2, 2, 2, 4, 1)
  DASS24_CASE(1, 4, 2, 4, 1) DASS24_CASE(1, 4, 4, 4, 1) DASS24_CASE(2, 4, 2, 4, 1)
  DASS24_CASE(1, 8, 2, 4, 1) DASS24_CASE(1, 8, 4, 4, 1)
  DASS24_CASE(1, 16, 2, 4, 1)
  // two token groups (WT = 2) and eight-warp blocks, for 32-128 tokens
  DASS24_CASE(2, 4, 2, 4, 2) DASS24_CASE(2, 8, 2, 4, 2) DASS24_CASE(1, 8, 4, 4, 2)
  DASS24_CASE(1, 16, 2, 4, 2) DASS24_CASE(1, 16, 2, 8, 1) DASS24_CASE(1, 8, 2, 8, 1)
#endif
#undef DASS24_CASE
  return cudaErrorInvalidValue;
#endif
#undef DASS24_LAUNCH_IF
}

#ifdef DASS24_FINISH
cudaError_t DASS24_FINISH(const float* ws, const void* bias, void* y, int N, long total, cudaStream_t s) {
  return launch_finish<DASS24_E>(ws, bias, y, N, total, s);
}
#endif

}  // namespace dass24
