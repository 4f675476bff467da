// One dtype unit of the wgmma kernel's instantiations (output orientation, sm_90a): the
// switch from a run-time (MT, WG, TS, NT, KS) to a compiled kernel (NT token tiles of 8,
// split over TS warpgroups: each one's wgmma has N = NT * 8 / TS). Included by
// nm24w_out_{bf16,f16}.cu. Only configurations that compile without spilling are listed
// (the 128-accumulator ones that spilled faulted on an H100).
//
// dass/infer/cuda/__init__.py's WG_CONFIGS must list the same (a CPU test compares them).
#include "nm24_wg.cuh"

namespace dass24 {

cudaError_t DASS24_RUN_WG(int mt, int wg, int ts, int nt, int ks, const Params& p, int splits, cudaStream_t s) {
#define DASS24_WG_CASE(MT, WG, TS, NT, KS)                     \
  if (mt == MT && wg == WG && ts == TS && nt == NT && ks == KS) \
    return launch_wg<DASS24_E, MT, NT * 8, KS, WG, TS>(p, splits, s);
  // WG_CONFIGS
  DASS24_WG_CASE(1, 1, 2, 16, 2) DASS24_WG_CASE(1, 1, 2, 16, 4)
  DASS24_WG_CASE(1, 1, 1, 8, 2) DASS24_WG_CASE(1, 1, 1, 8, 4) DASS24_WG_CASE(1, 2, 1, 8, 2) DASS24_WG_CASE(1, 2, 1, 8, 4)
  DASS24_WG_CASE(2, 1, 2, 8, 2)
  DASS24_WG_CASE(1, 2, 1, 4, 2) DASS24_WG_CASE(1, 2, 1, 4, 4) DASS24_WG_CASE(2, 1, 1, 4, 2) DASS24_WG_CASE(2, 1, 1, 4, 4)
  DASS24_WG_CASE(2, 2, 1, 4, 2)
  DASS24_WG_CASE(2, 1, 1, 2, 2) DASS24_WG_CASE(2, 1, 1, 2, 4) DASS24_WG_CASE(2, 2, 1, 2, 2)
#undef DASS24_WG_CASE
  return cudaErrorInvalidValue;
}

}  // namespace dass24
