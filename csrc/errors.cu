// Error codes of the C entry points are cudaError_t values; Python asks for their text here.
#include <cuda_runtime.h>

extern "C" const char* kpro_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// A cheap call that proves the library loaded, usable without a GPU.
extern "C" int kpro_library_version() { return 1; }
