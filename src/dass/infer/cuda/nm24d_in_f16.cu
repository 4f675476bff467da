// Instantiations: the register kernel's deep variant (57-128 tokens), orientation in, f16 (see nm24_dispatch.cuh).
#define DASS24_E __half
#define DASS24_ORI 0
#define DASS24_DEEP
#define DASS24_RUN run_deep_in_f16
#include "nm24_dispatch.cuh"
