// Instantiations of the shared-memory kernel: orientation in, f16 (see nm24_dispatch_smem.cuh).
#define DASS24_E __half
#define DASS24_ORI 0
#define DASS24_RUN_SMEM run_smem_in_f16
#include "nm24_dispatch_smem.cuh"
