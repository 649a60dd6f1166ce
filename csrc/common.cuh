// Shared device helpers: element loads as fp32, warp reductions, error plumbing for the C ABI.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "h3moe.h"

namespace h3moe {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace h3moe

// Return the first CUDA error (a launch error or an asynchronous one already reported) as a positive code.
#define H3MOE_CHECK_LAUNCH()                                  \
  do {                                                        \
    cudaError_t e_ = cudaGetLastError();                      \
    if (e_ != cudaSuccess) return static_cast<int>(e_);       \
  } while (0)

#define H3MOE_CHECK(call)                                     \
  do {                                                        \
    cudaError_t e_ = (call);                                  \
    if (e_ != cudaSuccess) return static_cast<int>(e_);       \
  } while (0)

// Dispatch a runtime dtype code to a type alias `scalar_t` (fp32 / fp16 / bf16).
#define H3MOE_DISPATCH_FLOAT(dtype, ...)                                    \
  switch (dtype) {                                                          \
    case H3MOE_F32: { using scalar_t = float; __VA_ARGS__; break; }         \
    case H3MOE_F16: { using scalar_t = __half; __VA_ARGS__; break; }        \
    case H3MOE_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return H3MOE_EDTYPE;                                           \
  }
