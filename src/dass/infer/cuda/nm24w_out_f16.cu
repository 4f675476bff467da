// Instantiations of the wgmma kernel: orientation out, f16 (see nm24_dispatch_wg.cuh).
#define DASS24_E __half
#define DASS24_RUN_WG run_wg_out_f16
#include "nm24_dispatch_wg.cuh"
