// The sparse-wgmma kernel (input orientation, sm_90a), f16.
#define DASS24_E __half
#define DASS24_RUN_WGS run_wgs_in_f16
#include "nm24_dispatch_wgs.cuh"
