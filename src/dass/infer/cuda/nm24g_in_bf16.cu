// The sparse-wgmma kernel (input orientation, sm_90a), bf16.
#define DASS24_E __nv_bfloat16
#define DASS24_RUN_WGS run_wgs_in_bf16
#include "nm24_dispatch_wgs.cuh"
