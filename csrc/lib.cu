// Library identity and error strings of the C ABI (no kernels).
#include <cuda_runtime.h>

#include "h3moe.h"

#ifndef H3MOE_VERSION_STR
#define H3MOE_VERSION_STR "0.0.0"
#endif
#ifndef H3MOE_ARCHS_STR
#define H3MOE_ARCHS_STR "unknown"
#endif

#define H3MOE_STR2(x) #x
#define H3MOE_STR(x) H3MOE_STR2(x)

extern "C" {

const char* h3moe_version(void) { return H3MOE_VERSION_STR; }

const char* h3moe_build_info(void) {
  return "archs=" H3MOE_ARCHS_STR " cuda=" H3MOE_STR(CUDART_VERSION) " kernels=route_fwd,route_bwd,sort_by_expert,"
         "moe_fwd(mma.sync m16n8k16)";
}

const char* h3moe_error_string(int code) {
  switch (code) {
    case H3MOE_OK: return "ok";
    case H3MOE_EINVAL: return "h3moe: invalid argument (a size, flag or null pointer)";
    case H3MOE_EDTYPE: return "h3moe: unsupported dtype for this kernel";
    case H3MOE_ELIMIT: return "h3moe: E or K beyond this kernel's limits";
    case H3MOE_EALIGN: return "h3moe: a pointer is not 16-byte aligned, or H / I is not a multiple of 8";
    case H3MOE_EWORKSPACE: return "h3moe: workspace too small";
    default:
      if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
      return "h3moe: unknown error";
  }
}

}  // extern "C"
