// Instantiations: GLU epilogue, orientation out, bf16 (see nm24_dispatch.cuh).
#define DASS24_E __nv_bfloat16
#define DASS24_ORI 1
#define DASS24_GLU
#define DASS24_RUN run_glu_out_bf16
#include "nm24_dispatch.cuh"
