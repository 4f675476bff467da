// Instantiations: GLU epilogue, orientation in, f16 (see nm24_dispatch.cuh).
#define DASS24_E __half
#define DASS24_ORI 0
#define DASS24_GLU
#define DASS24_RUN run_glu_in_f16
#include "nm24_dispatch.cuh"
