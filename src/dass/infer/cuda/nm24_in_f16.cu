// Instantiations: orientation in, f16 (see nm24_dispatch.cuh).
#define DASS24_E __half
#define DASS24_ORI 0
#define DASS24_RUN run_in_f16
#define DASS24_FINISH finish_f16
#include "nm24_dispatch.cuh"
