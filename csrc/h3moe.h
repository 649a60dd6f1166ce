/* h3moe C ABI: the CUDA kernels of h3moe's `cuda` backend, callable without torch (ctypes).
 *
 * Conventions
 *   - Every pointer is a device pointer to a contiguous row-major array; shapes are given at each
 *     argument with the letters T tokens, E experts, K top-k, H hidden, I intermediate, B samples,
 *     S = T*K rows (one per (token, slot) pair).
 *   - `dtype`: H3MOE_F32, H3MOE_F16 or H3MOE_BF16 (the element type of the `void*` tensors).
 *   - `stream` is a cudaStream_t (0 = legacy default stream). Nothing here synchronizes with the host:
 *     every entry point only enqueues kernels on `stream`.
 *   - Every entry point returns 0 on success, a positive cudaError_t from the CUDA runtime, or a negative
 *     H3MOE_E* code for a bad argument. h3moe_error_string(code) says what it means.
 */
#ifndef H3MOE_H_
#define H3MOE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define H3MOE_API __attribute__((visibility("default")))

enum { H3MOE_F32 = 0, H3MOE_F16 = 1, H3MOE_BF16 = 2 };
enum { H3MOE_SILU = 0, H3MOE_GELU = 1, H3MOE_GELU_TANH = 2, H3MOE_RELU = 3 };
enum {
  H3MOE_OK = 0,
  H3MOE_EINVAL = -1,     /* a size or flag is out of range */
  H3MOE_EDTYPE = -2,     /* unsupported dtype for this kernel */
  H3MOE_ELIMIT = -3,     /* E or K beyond the kernel's limits (see h3moe_route_max_*) */
  H3MOE_EALIGN = -4,     /* a pointer is not 16-byte aligned or H, I are not multiples of 8 */
  H3MOE_EWORKSPACE = -5, /* workspace too small (see h3moe_sort_workspace_bytes) */
};

H3MOE_API const char* h3moe_version(void);
/* "archs=80;90a cuda=13.0 ..." : the architectures this library was compiled for. */
H3MOE_API const char* h3moe_build_info(void);
H3MOE_API const char* h3moe_error_string(int code);
H3MOE_API int h3moe_route_max_experts(void); /* 256 */
H3MOE_API int h3moe_route_max_topk(void);    /* 8 */
H3MOE_API int h3moe_sort_max_experts(void);  /* 1024 */

/* Bytes of scratch h3moe_sort_by_expert / h3moe_route_fwd need for S = T*K rows over E experts. */
H3MOE_API size_t h3moe_sort_workspace_bytes(int64_t S, int E);

/* Permutation metadata of expert ids, equal to h3moe.ops.routing.sort_by_expert:
 *   ids (S,) int64 in [0, E) (ids out of range are skipped), counts (E,) int32, offsets (E+1,) int32
 *   exclusive prefix sum, sorted_slots (S,) int32: flat slot indices sorted by expert, stable. */
H3MOE_API int h3moe_sort_by_expert(const int64_t* ids, int64_t S, int E, int32_t* counts, int32_t* offsets,
                                   int32_t* sorted_slots, void* workspace, size_t workspace_bytes,
                                   void* stream);

/* Routing forward: fp32 softmax over E, top-K, optional renormalization, a warp per token.
 *   logits (T, E) dtype; E <= 256.
 *   K in 0..8. K = 0 computes no top-k (probabilities for the gating loss only): weights, ids and the
 *   metadata pointers are then ignored.
 *   weights (T, K) fp32 out, ids (T, K) int64 out (descending probability; ties: lower expert first).
 *   counts/offsets/sorted_slots: as h3moe_sort_by_expert, skipped when counts is NULL.
 *   Gating-loss accumulation (skipped when psum is NULL): token t belongs to sample t / sample_len and
 *   psum (B, E) fp32 += mask[t] * softmax(logits[t]) (mask (T,) fp32, NULL = all ones). psum is added to,
 *   not overwritten (the caller zeroes it once and may accumulate several layers). fp32 atomics: the
 *   summation order, hence the last bits of psum, vary from run to run. */
H3MOE_API int h3moe_route_fwd(const void* logits, int dtype, int64_t T, int E, int K, int renormalize,
                              float* weights, int64_t* ids, int64_t sample_len, const float* mask,
                              float* psum, int32_t* counts, int32_t* offsets, int32_t* sorted_slots,
                              void* workspace, size_t workspace_bytes, void* stream);

/* Routing backward, one pass over the logits: dlogits (T, E) dtype, written once (every element).
 *   ids (T, K) int64 and dweights (T, K) fp32 (NULL or K = 0: no top-k term): the gradient of the
 *   (renormalized) top-k weights; dpsum (B, E) fp32 (NULL: no gating term): the gradient of the psum the
 *   forward accumulated, with the same sample_len and mask. */
H3MOE_API int h3moe_route_bwd(const void* logits, int dtype, int64_t T, int E, int K, int renormalize,
                              const int64_t* ids, const float* dweights, int64_t sample_len,
                              const float* mask, const float* dpsum, void* dlogits, void* stream);

/* SwiGLU experts forward (inference), tensor cores (mma.sync m16n8k16, fp32 accumulation):
 *   x (T, H), w_gate_up (E, 2I, H) gate rows then up rows, w_down (E, H, I), all dtype fp16 or bf16;
 *   weights (T*K,) fp32 routing weights; offsets (E+1,), sorted_slots (T*K,) int32 from routing;
 *   activation H3MOE_SILU.. applied to the gate half; split_k: 0 = automatic (split the reduction only
 *   when too few warps would stream the weights, i.e. decode), n > 0 forces n splits (at most 16);
 *   workspace: scratch of h3moe_moe_workspace_bytes(...) bytes, 16-byte aligned, no initialization needed;
 *   y (T, H) dtype out (every element written). H and I must be multiples of 8 and every pointer
 *   16-byte aligned. Deterministic: no atomics. */
H3MOE_API size_t h3moe_moe_workspace_bytes(int dtype, int64_t T, int H, int I, int E, int K, int split_k);
H3MOE_API int h3moe_moe_fwd(const void* x, int dtype, int64_t T, int H, int I, int E, int K,
                            const void* w_gate_up, const void* w_down, const float* weights,
                            const int32_t* offsets, const int32_t* sorted_slots, int activation, int split_k,
                            void* workspace, size_t workspace_bytes, void* y, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* H3MOE_H_ */
