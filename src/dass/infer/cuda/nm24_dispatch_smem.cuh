// One (orientation, dtype) unit of the shared-memory kernel's instantiations: the switch
// from a run-time (MT, WN, NT, KS) to a compiled kernel (WM = 8 / WN warps along the rows,
// NT / WN token tiles a warp). Included by nm24s_{in,out}_{bf16,f16}.cu.
//
// dass/infer/cuda/__init__.py's SMEM_CONFIGS must list the same (a CPU test compares them).
#include "nm24_smem.cuh"

namespace dass24 {

cudaError_t DASS24_RUN_SMEM(int mt, int wn, int nt, int ks, const Params& p, int splits, cudaStream_t s) {
#define DASS24_SMEM_CASE(MT, WN, NT, KS)                    \
  if (mt == MT && wn == WN && nt == NT && ks == KS)         \
    return launch_smem<DASS24_E, DASS24_ORI, MT, NT / WN, KS, 8 / WN, WN>(p, splits, s);
#if DASS24_ORI == 0
  // SMEM_CONFIGS input
  DASS24_SMEM_CASE(2, 1, 2, 2) DASS24_SMEM_CASE(2, 1, 2, 4) DASS24_SMEM_CASE(4, 1, 2, 2) DASS24_SMEM_CASE(4, 1, 2, 4)
  DASS24_SMEM_CASE(1, 1, 4, 2) DASS24_SMEM_CASE(1, 1, 4, 4) DASS24_SMEM_CASE(2, 1, 4, 2) DASS24_SMEM_CASE(2, 1, 4, 4)
  DASS24_SMEM_CASE(4, 1, 4, 2) DASS24_SMEM_CASE(4, 1, 4, 4) DASS24_SMEM_CASE(1, 1, 8, 2) DASS24_SMEM_CASE(1, 1, 8, 4)
  DASS24_SMEM_CASE(2, 1, 8, 2) DASS24_SMEM_CASE(2, 1, 8, 4) DASS24_SMEM_CASE(2, 2, 8, 2) DASS24_SMEM_CASE(2, 2, 8, 4)
  DASS24_SMEM_CASE(4, 2, 8, 2) DASS24_SMEM_CASE(4, 2, 8, 4) DASS24_SMEM_CASE(1, 1, 16, 2) DASS24_SMEM_CASE(1, 1, 16, 4)
  DASS24_SMEM_CASE(2, 2, 16, 2) DASS24_SMEM_CASE(2, 2, 16, 4) DASS24_SMEM_CASE(4, 4, 16, 2) DASS24_SMEM_CASE(4, 4, 16, 4)
#else
  // SMEM_CONFIGS output
  DASS24_SMEM_CASE(1, 1, 2, 2) DASS24_SMEM_CASE(1, 1, 2, 4) DASS24_SMEM_CASE(2, 1, 2, 2) DASS24_SMEM_CASE(2, 1, 2, 4)
  DASS24_SMEM_CASE(1, 1, 4, 2) DASS24_SMEM_CASE(1, 1, 4, 4) DASS24_SMEM_CASE(2, 1, 4, 2) DASS24_SMEM_CASE(2, 1, 4, 4)
  DASS24_SMEM_CASE(1, 1, 8, 2) DASS24_SMEM_CASE(1, 1, 8, 4) DASS24_SMEM_CASE(1, 2, 8, 2) DASS24_SMEM_CASE(1, 2, 8, 4)
  DASS24_SMEM_CASE(2, 2, 8, 2) DASS24_SMEM_CASE(2, 2, 8, 4) DASS24_SMEM_CASE(1, 2, 16, 2) DASS24_SMEM_CASE(1, 2, 16, 4)
  DASS24_SMEM_CASE(2, 4, 16, 2) DASS24_SMEM_CASE(2, 4, 16, 4)
#endif
#undef DASS24_SMEM_CASE
  return cudaErrorInvalidValue;
}

}  // namespace dass24
