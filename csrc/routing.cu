// Routing: fp32 softmax + top-k (+ renormalization) with a warp per token, the permutation metadata
// (counts, offsets, stable sorted_slots) by a three-kernel counting sort, the gating-loss accumulation
// p̄ fused into the forward, and a one-pass backward for d(logits).
//
// Algorithm
//   route_fwd_kernel: a warp owns a run of consecutive tokens; lane l holds experts l, l+32, ... (EPL =
//     ceil(E/32) <= 8 registers). Softmax by two warp reductions (max, sum) in fp32; top-k by K rounds of
//     a warp arg-max (ties: lower expert index, as torch.topk on distinct values; NaN ranks below every
//     probability, so a NaN row still picks K distinct experts, with NaN weights). With psum given, each
//     warp sums mask[t]*p over its tokens of one sample in registers and flushes with one fp32 atomicAdd
//     per expert when the sample changes (no (T, E) probabilities are written).
//   sort_*: ids (S,) are cut into chunks of kChunk rows, one warp each. hist: per-chunk expert counts;
//     scan: one block turns them into each chunk's first output row per expert (and counts, offsets);
//     scatter: each warp walks its chunk in order, 32 rows at a time, ranking equal experts with
//     __match_any_sync, so sorted_slots is stable (token order within an expert) like torch's stable
//     argsort. No host synchronization anywhere.
//   route_bwd_kernel: recomputes p from the logits (nothing (T, E) was saved), forms dp from the top-k
//     gradient (through the renormalization) plus mask[t]*dpsum[b], and writes
//     dlogits = p * (dp - <p, dp>) once.
// Limits: E <= 256 and K <= 8 for routing (the Python side falls back beyond), E <= 1024 for the sort.
#include <climits>
#include <cmath>

#include "common.cuh"

namespace h3moe {

constexpr int kRouteMaxE = 256;
constexpr int kRouteMaxK = 8;
constexpr int kSortMaxE = 1024;
constexpr int kChunk = 1024;     // rows per warp in the sort (hist rows = ceil(S / kChunk))
constexpr int kSortWarps = 4;    // warps per block in hist/scatter: 4 * E ints of shared memory
constexpr int kRouteThreads = 256;

// ---------------------------------------------------------------------------------------------------
// forward
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_fwd_kernel(
    const T* __restrict__ logits,  // (Tn, E)
    int64_t Tn, int E, int K, int renorm,
    float* __restrict__ weights,   // (Tn, K) fp32
    int64_t* __restrict__ ids,     // (Tn, K) int64
    int64_t sample_len,
    const float* __restrict__ mask,  // (Tn,) fp32 or null
    float* __restrict__ psum,        // (B, E) fp32 accumulated, or null
    int tokens_per_warp) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t t0 = warp * tokens_per_warp;
  const int64_t t1 = min(Tn, t0 + tokens_per_warp);
  float acc[EPL];
#pragma unroll
  for (int j = 0; j < EPL; ++j) acc[j] = 0.f;
  int64_t cur_b = -1;

  for (int64_t t = t0; t < t1; ++t) {
    const T* row = logits + t * E;
    float p[EPL];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane + 32 * j;
      p[j] = e < E ? to_f32(row[e]) : -INFINITY;
      mx = fmaxf(mx, p[j]);
    }
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane + 32 * j;
      p[j] = e < E ? expf(p[j] - mx) : 0.f;
      s += p[j];
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < EPL; ++j) p[j] = p[j] / s;

    if (psum != nullptr) {
      const int64_t b = t / sample_len;
      if (b != cur_b) {
        if (cur_b >= 0) {
#pragma unroll
          for (int j = 0; j < EPL; ++j) {
            const int e = lane + 32 * j;
            if (e < E) atomicAdd(psum + cur_b * E + e, acc[j]);
            acc[j] = 0.f;
          }
        }
        cur_b = b;
      }
      const float mt = mask != nullptr ? mask[t] : 1.f;
#pragma unroll
      for (int j = 0; j < EPL; ++j) acc[j] += mt * p[j];
    }

    if (K > 0) {
      unsigned taken = 0;
      float topv[kRouteMaxK];
      int topi[kRouteMaxK];
      float tsum = 0.f;
#pragma unroll
      for (int k = 0; k < kRouteMaxK; ++k) {
        topv[k] = 0.f;
        topi[k] = 0;
        if (k < K) {
          float bv = -1.f;
          int bi = INT_MAX;
#pragma unroll
          for (int j = 0; j < EPL; ++j) {
            const int e = lane + 32 * j;
            // NaN (a NaN or inf logit makes the whole row NaN) ranks as -0.5, below every probability: such
            // a row still picks K distinct experts in range, so every slot gets its row of sorted_slots
            const float v = isnan(p[j]) ? -0.5f : p[j];
            if (e < E && !((taken >> j) & 1u) && v > bv) {
              bv = v;
              bi = e;
            }
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(kFull, bv, o);
            const int oi = __shfl_xor_sync(kFull, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
              bv = ov;
              bi = oi;
            }
          }
          topv[k] = bv == -0.5f ? NAN : bv;  // a NaN pick keeps its NaN weight: the output says so
          topi[k] = bi;
          tsum += topv[k];
          if (bi < E && (bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < kRouteMaxK; ++k) {
          if (k < K) {
            weights[t * K + k] = renorm ? topv[k] / tsum : topv[k];
            ids[t * K + k] = topi[k];
          }
        }
      }
    }
  }
  if (psum != nullptr && cur_b >= 0) {
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane + 32 * j;
      if (e < E) atomicAdd(psum + cur_b * E + e, acc[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// backward
template <typename T, int EPL>
__global__ void __launch_bounds__(kRouteThreads) route_bwd_kernel(
    const T* __restrict__ logits,      // (Tn, E)
    int64_t Tn, int E, int K, int renorm,
    const int64_t* __restrict__ ids,   // (Tn, K) int64 or null
    const float* __restrict__ dw,      // (Tn, K) fp32 or null
    int64_t sample_len,
    const float* __restrict__ mask,    // (Tn,) fp32 or null
    const float* __restrict__ dpsum,   // (B, E) fp32 or null
    T* __restrict__ dlogits) {         // (Tn, E) out
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= Tn) return;  // warp-uniform
  const T* row = logits + t * E;
  float p[EPL], dp[EPL];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < E ? to_f32(row[e]) : -INFINITY;
    mx = fmaxf(mx, p[j]);
    dp[j] = 0.f;
  }
  mx = warp_max(mx);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < E ? expf(p[j] - mx) : 0.f;
    s += p[j];
  }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < EPL; ++j) p[j] = p[j] / s;

  if (dw != nullptr && K > 0) {
    float q[kRouteMaxK], g[kRouteMaxK];
    int ei[kRouteMaxK];
    float qs = 0.f, dot = 0.f;
#pragma unroll
    for (int k = 0; k < kRouteMaxK; ++k) {
      q[k] = 0.f;
      g[k] = 0.f;
      ei[k] = -1;
      if (k < K) {
        const int64_t e64 = ids[t * K + k];
        const int e = (e64 >= 0 && e64 < E) ? static_cast<int>(e64) : -1;
        float v = 0.f;
#pragma unroll
        for (int j = 0; j < EPL; ++j)
          if (e >= 0 && j == (e >> 5)) v = p[j];
        v = __shfl_sync(kFull, v, e >= 0 ? (e & 31) : 0);
        q[k] = e >= 0 ? v : 0.f;
        ei[k] = e;
        g[k] = dw[t * K + k];
        qs += q[k];
        dot += g[k] * q[k];
      }
    }
    // w_k = q_k / qs  =>  dL/dq_k = (g_k - Σ_j g_j w_j) / qs
    const float gw = dot / qs;
#pragma unroll
    for (int k = 0; k < kRouteMaxK; ++k) {
      if (k < K && ei[k] >= 0 && (ei[k] & 31) == lane) {
        const float d = renorm ? (g[k] - gw) / qs : g[k];
#pragma unroll
        for (int j = 0; j < EPL; ++j)
          if (j == (ei[k] >> 5)) dp[j] += d;
      }
    }
  }
  if (dpsum != nullptr) {
    const int64_t b = t / sample_len;
    const float mt = mask != nullptr ? mask[t] : 1.f;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane + 32 * j;
      if (e < E) dp[j] += mt * dpsum[b * E + e];
    }
  }
  float pd = 0.f;
#pragma unroll
  for (int j = 0; j < EPL; ++j) pd += p[j] * dp[j];
  pd = warp_sum(pd);
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const int e = lane + 32 * j;
    if (e < E) dlogits[t * E + e] = from_f32<T>(p[j] * (dp[j] - pd));
  }
}

// ---------------------------------------------------------------------------------------------------
// sort by expert
__global__ void __launch_bounds__(kSortWarps * 32) sort_hist_kernel(
    const int64_t* __restrict__ ids,  // (S,)
    int64_t S, int E, int64_t nchunks,
    int32_t* __restrict__ hist) {     // (nchunks, E) out
  extern __shared__ int32_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int32_t* cnt = smem + warp * E;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  if (c >= nchunks) return;  // warp-uniform, no block barrier below
  for (int e = lane; e < E; e += 32) cnt[e] = 0;
  __syncwarp();
  const int64_t s0 = c * kChunk, s1 = min(S, s0 + kChunk);
  for (int64_t s = s0 + lane; s < s1; s += 32) {
    const int64_t e = ids[s];
    if (e >= 0 && e < E) atomicAdd(cnt + e, 1);
  }
  __syncwarp();
  for (int e = lane; e < E; e += 32) hist[c * E + e] = cnt[e];
}

// One block of kSortMaxE threads: per expert, turn chunk counts into each chunk's first output row.
__global__ void __launch_bounds__(kSortMaxE) sort_scan_kernel(
    int32_t* __restrict__ hist,    // (nchunks, E) in: counts, out: first output row
    int64_t nchunks, int E,
    int32_t* __restrict__ counts,  // (E,)
    int32_t* __restrict__ offsets) {  // (E+1,)
  __shared__ int32_t sh[kSortMaxE];
  const int e = threadIdx.x;
  int32_t total = 0;
  if (e < E) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int32_t v = hist[c * E + e];
      hist[c * E + e] = total;
      total += v;
    }
  }
  sh[e] = total;
  __syncthreads();
  for (int o = 1; o < kSortMaxE; o <<= 1) {  // inclusive Hillis-Steele scan over experts
    const int32_t v = e >= o ? sh[e - o] : 0;
    __syncthreads();
    sh[e] += v;
    __syncthreads();
  }
  const int32_t excl = sh[e] - total;
  if (e < E) {
    counts[e] = total;
    offsets[e] = excl;
    for (int64_t c = 0; c < nchunks; ++c) hist[c * E + e] += excl;
  }
  if (e == E - 1) offsets[E] = sh[e];
}

__global__ void __launch_bounds__(kSortWarps * 32) sort_scatter_kernel(
    const int64_t* __restrict__ ids,   // (S,)
    int64_t S, int E, int64_t nchunks,
    const int32_t* __restrict__ hist,  // (nchunks, E) first output row of each chunk per expert
    int32_t* __restrict__ sorted) {    // (S,) out
  extern __shared__ int32_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int32_t* cnt = smem + warp * E;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  if (c >= nchunks) return;  // warp-uniform
  for (int e = lane; e < E; e += 32) cnt[e] = hist[c * E + e];
  __syncwarp();
  const int64_t s0 = c * kChunk, s1 = min(S, s0 + kChunk);
  for (int64_t base = s0; base < s1; base += 32) {  // uniform trip count across the warp
    const int64_t s = base + lane;
    int e = -1;
    if (s < s1) {
      const int64_t v = ids[s];
      if (v >= 0 && v < E) e = static_cast<int>(v);
    }
    const unsigned peers = __match_any_sync(kFull, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0) sorted[cnt[e] + rank] = static_cast<int32_t>(s);
    __syncwarp();
    if (e >= 0 && rank == 0) cnt[e] += __popc(peers);
    __syncwarp();
  }
}

static int64_t sort_chunks(int64_t S) { return (S + kChunk - 1) / kChunk; }

static int launch_sort(const int64_t* ids, int64_t S, int E, int32_t* counts, int32_t* offsets,
                       int32_t* sorted, void* ws, size_t ws_bytes, cudaStream_t stream) {
  if (S < 0 || E < 1) return H3MOE_EINVAL;
  if (E > kSortMaxE) return H3MOE_ELIMIT;
  if (S > INT32_MAX) return H3MOE_EINVAL;
  const int64_t nchunks = sort_chunks(S);
  if (ws_bytes < h3moe_sort_workspace_bytes(S, E) || (ws == nullptr && nchunks > 0)) return H3MOE_EWORKSPACE;
  int32_t* hist = static_cast<int32_t*>(ws);
  const size_t smem = sizeof(int32_t) * kSortWarps * E;
  const unsigned blocks = static_cast<unsigned>((nchunks + kSortWarps - 1) / kSortWarps);
  if (blocks > 0) {
    sort_hist_kernel<<<blocks, kSortWarps * 32, smem, stream>>>(ids, S, E, nchunks, hist);
    H3MOE_CHECK_LAUNCH();
  }
  sort_scan_kernel<<<1, kSortMaxE, 0, stream>>>(hist, nchunks, E, counts, offsets);
  H3MOE_CHECK_LAUNCH();
  if (blocks > 0) {
    sort_scatter_kernel<<<blocks, kSortWarps * 32, smem, stream>>>(ids, S, E, nchunks, hist, sorted);
    H3MOE_CHECK_LAUNCH();
  }
  return H3MOE_OK;
}

template <typename T>
static int launch_route_fwd(const T* logits, int64_t Tn, int E, int K, int renorm, float* weights,
                            int64_t* ids, int64_t sample_len, const float* mask, float* psum,
                            cudaStream_t stream) {
  const int tpw = psum != nullptr ? 8 : 1;  // tokens per warp: 8 cuts psum atomics 8x
  const int64_t warps = (Tn + tpw - 1) / tpw;
  const int64_t blocks = (warps * 32 + kRouteThreads - 1) / kRouteThreads;
  if (blocks == 0) return H3MOE_OK;
  const int epl = (E + 31) / 32;
#define H3MOE_ROUTE_FWD(N)                                                                         \
  route_fwd_kernel<T, N><<<static_cast<unsigned>(blocks), kRouteThreads, 0, stream>>>(              \
      logits, Tn, E, K, renorm, weights, ids, sample_len, mask, psum, tpw)
  if (epl <= 1) H3MOE_ROUTE_FWD(1);
  else if (epl <= 2) H3MOE_ROUTE_FWD(2);
  else if (epl <= 4) H3MOE_ROUTE_FWD(4);
  else H3MOE_ROUTE_FWD(8);
#undef H3MOE_ROUTE_FWD
  H3MOE_CHECK_LAUNCH();
  return H3MOE_OK;
}

template <typename T>
static int launch_route_bwd(const T* logits, int64_t Tn, int E, int K, int renorm, const int64_t* ids,
                            const float* dw, int64_t sample_len, const float* mask, const float* dpsum,
                            T* dlogits, cudaStream_t stream) {
  const int64_t blocks = (Tn * 32 + kRouteThreads - 1) / kRouteThreads;
  if (blocks == 0) return H3MOE_OK;
  const int epl = (E + 31) / 32;
#define H3MOE_ROUTE_BWD(N)                                                                         \
  route_bwd_kernel<T, N><<<static_cast<unsigned>(blocks), kRouteThreads, 0, stream>>>(              \
      logits, Tn, E, K, renorm, ids, dw, sample_len, mask, dpsum, dlogits)
  if (epl <= 1) H3MOE_ROUTE_BWD(1);
  else if (epl <= 2) H3MOE_ROUTE_BWD(2);
  else if (epl <= 4) H3MOE_ROUTE_BWD(4);
  else H3MOE_ROUTE_BWD(8);
#undef H3MOE_ROUTE_BWD
  H3MOE_CHECK_LAUNCH();
  return H3MOE_OK;
}

}  // namespace h3moe

using namespace h3moe;

extern "C" {

int h3moe_route_max_experts(void) { return kRouteMaxE; }
int h3moe_route_max_topk(void) { return kRouteMaxK; }
int h3moe_sort_max_experts(void) { return kSortMaxE; }

size_t h3moe_sort_workspace_bytes(int64_t S, int E) {
  if (S < 0 || E < 1) return 0;
  return sizeof(int32_t) * static_cast<size_t>(sort_chunks(S)) * static_cast<size_t>(E);
}

int h3moe_sort_by_expert(const int64_t* ids, int64_t S, int E, int32_t* counts, int32_t* offsets,
                         int32_t* sorted_slots, void* workspace, size_t workspace_bytes, void* stream) {
  if (counts == nullptr || offsets == nullptr || (S > 0 && (ids == nullptr || sorted_slots == nullptr)))
    return H3MOE_EINVAL;
  return launch_sort(ids, S, E, counts, offsets, sorted_slots, workspace, workspace_bytes,
                     static_cast<cudaStream_t>(stream));
}

int h3moe_route_fwd(const void* logits, int dtype, int64_t T, int E, int K, int renormalize, float* weights,
                    int64_t* ids, int64_t sample_len, const float* mask, float* psum, int32_t* counts,
                    int32_t* offsets, int32_t* sorted_slots, void* workspace, size_t workspace_bytes,
                    void* stream) {
  if (T < 0 || E < 1 || K < 0 || K > E) return H3MOE_EINVAL;
  if (E > kRouteMaxE || K > kRouteMaxK) return H3MOE_ELIMIT;
  if (T > 0 && logits == nullptr) return H3MOE_EINVAL;
  if (K > 0 && T > 0 && (weights == nullptr || ids == nullptr)) return H3MOE_EINVAL;
  if (psum != nullptr && (sample_len < 1 || T % sample_len != 0)) return H3MOE_EINVAL;
  if (K == 0 && psum == nullptr) return H3MOE_EINVAL;  // nothing to compute
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int rc = H3MOE_OK;
  H3MOE_DISPATCH_FLOAT(dtype, rc = launch_route_fwd(static_cast<const scalar_t*>(logits), T, E, K, renormalize,
                                                     weights, ids, sample_len, mask, psum, st));
  if (rc != H3MOE_OK) return rc;
  if (K > 0 && counts != nullptr) {
    if (offsets == nullptr || (T > 0 && sorted_slots == nullptr)) return H3MOE_EINVAL;
    rc = launch_sort(ids, T * K, E, counts, offsets, sorted_slots, workspace, workspace_bytes, st);
  }
  return rc;
}

int h3moe_route_bwd(const void* logits, int dtype, int64_t T, int E, int K, int renormalize, const int64_t* ids,
                    const float* dweights, int64_t sample_len, const float* mask, const float* dpsum,
                    void* dlogits, void* stream) {
  if (T < 0 || E < 1 || K < 0 || K > E) return H3MOE_EINVAL;
  if (E > kRouteMaxE || K > kRouteMaxK) return H3MOE_ELIMIT;
  if (T > 0 && (logits == nullptr || dlogits == nullptr)) return H3MOE_EINVAL;
  if (dweights != nullptr && K > 0 && ids == nullptr) return H3MOE_EINVAL;
  if (dpsum != nullptr && (sample_len < 1 || T % sample_len != 0)) return H3MOE_EINVAL;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int rc = H3MOE_OK;
  H3MOE_DISPATCH_FLOAT(dtype, rc = launch_route_bwd(static_cast<const scalar_t*>(logits), T, E, K, renormalize, ids,
                                                     dweights, sample_len, mask, dpsum,
                                                     static_cast<scalar_t*>(dlogits), st));
  return rc;
}

}  // extern "C"
