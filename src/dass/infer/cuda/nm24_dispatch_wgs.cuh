// One dtype unit of the sparse-wgmma kernel's instantiations (input orientation, sm_90a): the
// switch from a run-time (MT, WG, NT, KS, WS) to a compiled kernel (MT m64 tiles a warpgroup,
// WG warpgroups a block, NT token tiles of 8 = the wgmma's N / 8, KS K-steps a stage, WS = 1:
// the weight staged in shared memory with the tokens). Included
// by nm24g_in_{bf16,f16}.cu. Only configurations that compile without spilling are listed.
//
// dass/infer/cuda/__init__.py's WGS_CONFIGS must list the same (a CPU test compares them).
#include "nm24_wgs.cuh"

namespace dass24 {

cudaError_t DASS24_RUN_WGS(int mt, int wg, int nt, int ks, int ws, const Params& p, int splits, cudaStream_t s) {
#define DASS24_WGS_CASE(MT, WG, NT, KS, WS)                         \
  if (mt == MT && wg == WG && nt == NT && ks == KS && ws == WS)    \
    return launch_wgs<DASS24_E, MT, NT * 8, KS, WG, WS>(p, splits, s);
  // WGS_CONFIGS
  DASS24_WGS_CASE(1, 1, 16, 2, 0) DASS24_WGS_CASE(1, 1, 16, 4, 0) DASS24_WGS_CASE(1, 2, 16, 2, 0) DASS24_WGS_CASE(1, 2, 16, 4, 0)
  DASS24_WGS_CASE(2, 1, 16, 2, 0) DASS24_WGS_CASE(2, 2, 16, 2, 0)
  DASS24_WGS_CASE(1, 1, 8, 4, 0) DASS24_WGS_CASE(1, 2, 8, 4, 0) DASS24_WGS_CASE(2, 1, 8, 2, 0) DASS24_WGS_CASE(2, 1, 8, 4, 0)
  DASS24_WGS_CASE(2, 2, 8, 2, 0) DASS24_WGS_CASE(2, 2, 8, 4, 0)
  DASS24_WGS_CASE(2, 1, 4, 4, 0) DASS24_WGS_CASE(2, 2, 4, 4, 0) DASS24_WGS_CASE(1, 2, 4, 4, 0)
  DASS24_WGS_CASE(2, 1, 2, 4, 0) DASS24_WGS_CASE(2, 2, 2, 4, 0)
  // the weight through shared memory
  DASS24_WGS_CASE(1, 1, 16, 2, 1) DASS24_WGS_CASE(1, 2, 16, 2, 1) DASS24_WGS_CASE(2, 1, 16, 2, 1) DASS24_WGS_CASE(2, 2, 16, 2, 1)
  DASS24_WGS_CASE(1, 2, 8, 4, 1) DASS24_WGS_CASE(2, 1, 8, 2, 1) DASS24_WGS_CASE(2, 2, 8, 2, 1) DASS24_WGS_CASE(2, 2, 8, 4, 1)
  DASS24_WGS_CASE(2, 2, 4, 4, 1)
  // three and four warpgroups a block of one m64 tile each (192 / 256 rows): at 64-128 tokens
  // every block re-reads all the tokens, so rows a block set the token bytes through L2
  DASS24_WGS_CASE(1, 3, 16, 2, 0) DASS24_WGS_CASE(1, 4, 16, 2, 0) DASS24_WGS_CASE(1, 3, 16, 2, 1)
  DASS24_WGS_CASE(1, 3, 8, 4, 0) DASS24_WGS_CASE(1, 4, 8, 4, 0) DASS24_WGS_CASE(1, 3, 8, 4, 1) DASS24_WGS_CASE(1, 4, 8, 4, 1)
#undef DASS24_WGS_CASE
  return cudaErrorInvalidValue;
}

}  // namespace dass24
