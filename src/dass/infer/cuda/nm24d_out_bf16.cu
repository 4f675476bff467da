// Instantiations: the register kernel's deep variant (57-128 tokens), orientation out, bf16 (see nm24_dispatch.cuh).
#define DASS24_E __nv_bfloat16
#define DASS24_ORI 1
#define DASS24_DEEP
#define DASS24_RUN run_deep_out_bf16
#include "nm24_dispatch.cuh"
