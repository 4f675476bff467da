// Instantiations of the shared-memory kernel: orientation out, bf16 (see nm24_dispatch_smem.cuh).
#define DASS24_E __nv_bfloat16
#define DASS24_ORI 1
#define DASS24_RUN_SMEM run_smem_out_bf16
#include "nm24_dispatch_smem.cuh"
