// Instantiations of the wgmma kernel: orientation out, bf16 (see nm24_dispatch_wg.cuh).
#define DASS24_E __nv_bfloat16
#define DASS24_RUN_WG run_wg_out_bf16
#include "nm24_dispatch_wg.cuh"
