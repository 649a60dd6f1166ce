// SwiGLU experts forward on tensor cores: gather → gate_up GEMM + act(gate)·up epilogue → down GEMM +
// routing-weight epilogue → deterministic combine of the K slots.
//
// Algorithm ("weight streaming", built for decode, correct for any T)
//   Rows are the S = T*K (token, slot) pairs sorted by expert (Routing.offsets / sorted_slots). Grid:
//   (N column groups / warps, E experts, gz row-chunk strides). A warp owns 8*NT output columns of one
//   expert (for gate_up: 8*NT gate columns and the matching up columns, so the activation is fused) and
//   walks that expert's rows 16*MT at a time, the whole reduction dimension per chunk. No shared memory:
//   operands go straight from global memory to mma.sync m16n8k16 registers (fp32 accumulation).
//   Each lane loads 16 contiguous bytes (8 elements along k) of a row per 32-wide k step; the mma's k
//   slots are permuted consistently for A and B (a sum over k does not depend on the order), so lane
//   (g = lane/4, q = lane%4) feeds k = q*8 + {0..3} to the first mma and q*8 + {4..7} to the second.
//   Rows of a weight tile are read with 4 lanes × 16 B = 64 contiguous bytes: full 32-byte sectors.
//   An empty expert's blocks exit at once; nothing synchronizes with the host.
//   Epilogue 1 writes act(gate)·up rounded to the input dtype (S, I) in sorted-row order (as the torch path
//   rounds h). Epilogue 2 multiplies by the routing weight in fp32 and writes each slot's row once into
//   an fp32 (S, H) buffer indexed by slot; the combine kernel sums the K slots of each token in fp32.
//   Split-K (decode): when columns × active experts × row chunks give fewer than ~4096 warps, the
//   reduction dimension is cut into up to 16 ranges (>= 256 elements each) along grid.z; each split writes
//   its own fp32 partial buffer (every element, no atomics), and the activation kernel (gate_up) or the
//   combine kernel (down) sums the splits in a fixed order: deterministic, and still no host sync.
// Limits: fp16/bf16; H and I multiples of 8; 16-byte aligned pointers. Weights are re-read once per
//   16*MT-row chunk of an expert, so prefill (hundreds of rows per expert) is L2-bound: the Triton path
//   is the prefill kernel, this one the decode kernel (T <= 64).
#include "common.cuh"

namespace h3moe {

constexpr int kGemmWarps = 4;

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two mmas covering a 32-wide k step: A rows g (a_lo) and g+8 (a_hi), B row (b), 16 bytes each.
template <typename T>
__device__ __forceinline__ void mma_k32(float (&d)[4], const uint4& a_lo, const uint4& a_hi, const uint4& b) {
  mma16816(d, a_lo.x, a_hi.x, a_lo.y, a_hi.y, b.x, b.y, T());
  mma16816(d, a_lo.z, a_hi.z, a_lo.w, a_hi.w, b.z, b.w, T());
}

__device__ __forceinline__ uint4 ld16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <int ACT>
__device__ __forceinline__ float act_fn(float v) {
  if constexpr (ACT == H3MOE_SILU) {
    return v / (1.f + expf(-v));
  } else if constexpr (ACT == H3MOE_GELU) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  } else if constexpr (ACT == H3MOE_GELU_TANH) {
    return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  } else {
    return fmaxf(v, 0.f);
  }
}

__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}

template <typename T, int ACT, int MT, int NT>
__global__ void __launch_bounds__(kGemmWarps * 32) gate_up_kernel(
    const T* __restrict__ x,                  // (Tn, H)
    const T* __restrict__ w,                  // (E, 2I, H) gate rows [0, I), up rows [I, 2I)
    const int32_t* __restrict__ offsets,      // (E+1,)
    const int32_t* __restrict__ sorted_slots, // (S,)
    int K, int H, int I, int S,
    int gz, int klen,                         // row-chunk blocks per split; k elements per split (32·n)
    T* __restrict__ out,                      // (S, I) act(gate)*up, sorted rows (one split)
    float* __restrict__ part) {               // (splits, S, 2I) fp32 gate | up partial sums, or null
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int e = blockIdx.y;
  const int split = blockIdx.z / gz, zc = blockIdx.z % gz;
  const int kb = split * klen, ke = min(H, kb + klen);
  const int n0 = (blockIdx.x * kGemmWarps + warp) * (8 * NT);
  if (n0 >= I) return;  // warp-uniform; no block barriers in this kernel
  const int r0 = offsets[e], r1 = offsets[e + 1];
  const T* we = w + static_cast<size_t>(e) * 2 * I * H;
  const T* bg[NT];
  const T* bu[NT];
  bool bv[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n = n0 + nt * 8 + g;
    bv[nt] = n < I;
    bg[nt] = we + static_cast<size_t>(bv[nt] ? n : 0) * H;
    bu[nt] = we + static_cast<size_t>(I + (bv[nt] ? n : 0)) * H;
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int m0 = r0 + zc * 16 * MT; m0 < r1; m0 += gz * 16 * MT) {
    const T* ar[MT][2];
    bool av[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + mt * 16 + h * 8 + g;
        av[mt][h] = r < r1;
        const int tok = av[mt][h] ? sorted_slots[r] / K : 0;
        ar[mt][h] = x + static_cast<size_t>(tok) * H;
      }
    float cg[MT][NT][4], cu[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) cg[mt][nt][i] = cu[mt][nt][i] = 0.f;

#pragma unroll 2
    for (int k0 = kb; k0 < ke; k0 += 32) {
      const int kk = k0 + q * 8;
      const bool kv = kk < ke;
      uint4 a[MT][2], b_g[NT], b_u[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        b_g[nt] = (kv && bv[nt]) ? ld16(bg[nt] + kk) : zero;
        b_u[nt] = (kv && bv[nt]) ? ld16(bu[nt] + kk) : zero;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) a[mt][h] = (kv && av[mt][h]) ? ld16(ar[mt][h] + kk) : zero;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma_k32<T>(cg[mt][nt], a[mt][0], a[mt][1], b_g[nt]);
          mma_k32<T>(cu[mt][nt], a[mt][0], a[mt][1], b_u[nt]);
        }
    }
    // C fragment: c[0], c[1] row g, columns 2q, 2q+1; c[2], c[3] row g+8.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + mt * 16 + h * 8 + g;
        if (r >= r1) continue;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int col = n0 + nt * 8 + 2 * q;
          if (col >= I) continue;  // I % 8 == 0: col + 1 < I too
          if (part == nullptr) {
            const float v0 = act_fn<ACT>(cg[mt][nt][2 * h]) * cu[mt][nt][2 * h];
            const float v1 = act_fn<ACT>(cg[mt][nt][2 * h + 1]) * cu[mt][nt][2 * h + 1];
            store2(out + static_cast<size_t>(r) * I + col, v0, v1);
          } else {
            float* pr = part + (static_cast<size_t>(split) * S + r) * 2 * I;
            *reinterpret_cast<float2*>(pr + col) = make_float2(cg[mt][nt][2 * h], cg[mt][nt][2 * h + 1]);
            *reinterpret_cast<float2*>(pr + I + col) = make_float2(cu[mt][nt][2 * h], cu[mt][nt][2 * h + 1]);
          }
        }
      }
  }
}

template <typename T, int MT, int NT>
__global__ void __launch_bounds__(kGemmWarps * 32) down_kernel(
    const T* __restrict__ a,                  // (S, I) sorted rows
    const T* __restrict__ w,                  // (E, H, I)
    const int32_t* __restrict__ offsets,      // (E+1,)
    const int32_t* __restrict__ sorted_slots, // (S,)
    const float* __restrict__ rw,             // (S,) routing weight of each flat slot t*K+k
    int H, int I, int S,
    int gz, int klen,                         // row-chunk blocks per split; k elements per split (32·n)
    float* __restrict__ slot_out) {           // (splits, S, H) fp32, row = flat slot
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int e = blockIdx.y;
  const int split = blockIdx.z / gz, zc = blockIdx.z % gz;
  const int kb = split * klen, ke = min(I, kb + klen);
  const int n0 = (blockIdx.x * kGemmWarps + warp) * (8 * NT);
  if (n0 >= H) return;
  const int r0 = offsets[e], r1 = offsets[e + 1];
  const T* we = w + static_cast<size_t>(e) * H * I;
  const T* br[NT];
  bool bv[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n = n0 + nt * 8 + g;
    bv[nt] = n < H;
    br[nt] = we + static_cast<size_t>(bv[nt] ? n : 0) * I;
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int m0 = r0 + zc * 16 * MT; m0 < r1; m0 += gz * 16 * MT) {
    const T* ar[MT][2];
    bool av[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + mt * 16 + h * 8 + g;
        av[mt][h] = r < r1;
        ar[mt][h] = a + static_cast<size_t>(av[mt][h] ? r : 0) * I;
      }
    float c[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) c[mt][nt][i] = 0.f;

#pragma unroll 2
    for (int k0 = kb; k0 < ke; k0 += 32) {
      const int kk = k0 + q * 8;
      const bool kv = kk < ke;
      uint4 av4[MT][2], b[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) b[nt] = (kv && bv[nt]) ? ld16(br[nt] + kk) : zero;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) av4[mt][h] = (kv && av[mt][h]) ? ld16(ar[mt][h] + kk) : zero;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_k32<T>(c[mt][nt], av4[mt][0], av4[mt][1], b[nt]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + mt * 16 + h * 8 + g;
        if (r >= r1) continue;
        const int slot = sorted_slots[r];
        const float wt = rw[slot];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int col = n0 + nt * 8 + 2 * q;
          if (col >= H) continue;  // H % 8 == 0: col + 1 < H too
          *reinterpret_cast<float2*>(slot_out + (static_cast<size_t>(split) * S + slot) * H + col) =
              make_float2(c[mt][nt][2 * h] * wt, c[mt][nt][2 * h + 1] * wt);
        }
      }
  }
}

// act_ws[r, n] = act(Σ_s gate_s[r, n]) · Σ_s up_s[r, n] over the split-K partial sums.
template <typename T, int ACT>
__global__ void splitk_act_kernel(const float* __restrict__ part,  // (splits, S, 2I) fp32
                                  int splits, int64_t S, int I,
                                  T* __restrict__ out) {            // (S, I)
  const int64_t pairs = S * (I / 2);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / (I / 2);
    const int n = static_cast<int>(i % (I / 2)) * 2;
    float g0 = 0.f, g1 = 0.f, u0 = 0.f, u1 = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float* pr = part + (sp * S + r) * 2 * I;
      const float2 gv = *reinterpret_cast<const float2*>(pr + n);
      const float2 uv = *reinterpret_cast<const float2*>(pr + I + n);
      g0 += gv.x; g1 += gv.y; u0 += uv.x; u1 += uv.y;
    }
    store2(out + r * I + n, act_fn<ACT>(g0) * u0, act_fn<ACT>(g1) * u1);
  }
}

// y[t, :] = Σ_split Σ_k slot_out[split, t*K + k, :], summed in fp32 in a fixed order (deterministic).
template <typename T>
__global__ void combine_kernel(const float* __restrict__ slot_out,  // (splits, Tn*K, H)
                               int splits, int64_t Tn, int K, int H,
                               T* __restrict__ y) {                  // (Tn, H)
  const int64_t pairs = Tn * (H / 2);
  const int64_t S = Tn * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / (H / 2);
    const int h = static_cast<int>(i % (H / 2)) * 2;
    float s0 = 0.f, s1 = 0.f;
    for (int sp = 0; sp < splits; ++sp)
      for (int k = 0; k < K; ++k) {
        const float2 v = *reinterpret_cast<const float2*>(slot_out + (sp * S + t * K + k) * H + h);
        s0 += v.x;
        s1 += v.y;
      }
    store2(y + t * H + h, s0, s1);
  }
}

constexpr int kNT = 4;               // n8 tiles per warp: 32 output columns (64 weight rows for gate_up)
constexpr int kTargetWarps = 4096;   // ~31 warps per SM on a 132-SM H100: enough loads in flight for HBM
constexpr int kMinSplitK = 256;      // at least 8 k steps of 32 per split
constexpr int kMaxSplits = 16;

struct Plan {
  int mt;           // m16 tiles per row chunk (1 or 2)
  int gz;           // row-chunk blocks per expert (grid.z / splits)
  int s1, klen1;    // gate_up split-K: splits and k elements per split
  int s2, klen2;    // down split-K
  size_t act_bytes, part_bytes, slot_bytes;
};

static size_t round256(size_t b) { return (b + 255) / 256 * 256; }

static int row_chunk_blocks(int64_t S, int E, int rows_per_chunk) {
  const int64_t chunks_total = (S + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t per_expert = (S / E + rows_per_chunk - 1) / rows_per_chunk;
  int64_t gz = 2 * (per_expert > 0 ? per_expert : 1);  // slack for unbalanced experts; warps stride the rest
  if (gz > chunks_total) gz = chunks_total;
  if (gz < 1) gz = 1;
  if (gz > 4000) gz = 4000;  // grid.z = gz * splits <= 4000 * 16 < 65536
  return static_cast<int>(gz);
}

// Split the reduction when (columns × active experts × row chunks) gives too few warps to stream the
// weights at full bandwidth (decode); never below kMinSplitK elements per split. split_k > 0 forces it.
static void split_k(int split_req, int N, int Kdim, int E, int64_t S, int gz, int* splits, int* klen) {
  const int steps = (Kdim + 31) / 32;
  int s;
  if (split_req > 0) {
    s = split_req < kMaxSplits ? split_req : kMaxSplits;
  } else {
    const int64_t active = S < E ? S : E;
    const int64_t warps = static_cast<int64_t>((N + 8 * kNT - 1) / (8 * kNT)) * active * gz;
    s = static_cast<int>((kTargetWarps + warps - 1) / warps);
    const int cap = Kdim / kMinSplitK;
    if (s > cap) s = cap;
    if (s > kMaxSplits) s = kMaxSplits;
  }
  if (s > steps) s = steps;
  if (s < 1) s = 1;
  const int per = (steps + s - 1) / s;  // k steps per split
  *klen = per * 32;
  *splits = (steps + per - 1) / per;  // drop splits that would be empty
}

static Plan make_plan(int elt, int64_t T, int H, int I, int E, int K, int split_req) {
  Plan p;
  const int64_t S = T * K;
  p.mt = S <= 16LL * E ? 1 : 2;  // one m16 tile per chunk while experts average <= 16 rows (decode)
  p.gz = row_chunk_blocks(S, E, 16 * p.mt);
  split_k(split_req, I, H, E, S, p.gz, &p.s1, &p.klen1);
  split_k(split_req, H, I, E, S, p.gz, &p.s2, &p.klen2);
  p.act_bytes = round256(static_cast<size_t>(S) * I * elt);
  p.part_bytes = p.s1 > 1 ? round256(static_cast<size_t>(p.s1) * S * 2 * I * sizeof(float)) : 0;
  p.slot_bytes = round256(static_cast<size_t>(p.s2) * S * H * sizeof(float));
  return p;
}

static unsigned elementwise_blocks(int64_t pairs) {
  int64_t blocks = (pairs + 255) / 256;
  if (blocks > 65535) blocks = 65535;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

template <typename T, int ACT, int MT>
static int launch_moe_mt(const Plan& p, const T* x, int64_t Tn, int H, int I, int E, int K, const T* wgu,
                         const T* wd, const float* rw, const int32_t* offsets, const int32_t* sorted,
                         char* ws, T* y, cudaStream_t st) {
  const int S = static_cast<int>(Tn * K);
  T* act_ws = reinterpret_cast<T*>(ws);
  float* part = p.s1 > 1 ? reinterpret_cast<float*>(ws + p.act_bytes) : nullptr;
  float* slot_ws = reinterpret_cast<float*>(ws + p.act_bytes + p.part_bytes);
  const int groups1 = (I + 8 * kNT - 1) / (8 * kNT), groups2 = (H + 8 * kNT - 1) / (8 * kNT);
  const dim3 g1((groups1 + kGemmWarps - 1) / kGemmWarps, E, p.gz * p.s1);
  gate_up_kernel<T, ACT, MT, kNT><<<g1, kGemmWarps * 32, 0, st>>>(x, wgu, offsets, sorted, K, H, I, S, p.gz,
                                                                  p.klen1, act_ws, part);
  H3MOE_CHECK_LAUNCH();
  if (p.s1 > 1) {
    splitk_act_kernel<T, ACT><<<elementwise_blocks(static_cast<int64_t>(S) * (I / 2)), 256, 0, st>>>(
        part, p.s1, S, I, act_ws);
    H3MOE_CHECK_LAUNCH();
  }
  const dim3 g2((groups2 + kGemmWarps - 1) / kGemmWarps, E, p.gz * p.s2);
  down_kernel<T, MT, kNT><<<g2, kGemmWarps * 32, 0, st>>>(act_ws, wd, offsets, sorted, rw, H, I, S, p.gz,
                                                          p.klen2, slot_ws);
  H3MOE_CHECK_LAUNCH();
  combine_kernel<T><<<elementwise_blocks(Tn * (H / 2)), 256, 0, st>>>(slot_ws, p.s2, Tn, K, H, y);
  H3MOE_CHECK_LAUNCH();
  return H3MOE_OK;
}

template <typename T, int ACT>
static int launch_moe(const Plan& p, const T* x, int64_t Tn, int H, int I, int E, int K, const T* wgu,
                      const T* wd, const float* rw, const int32_t* offsets, const int32_t* sorted, char* ws,
                      T* y, cudaStream_t st) {
  if (p.mt == 1)
    return launch_moe_mt<T, ACT, 1>(p, x, Tn, H, I, E, K, wgu, wd, rw, offsets, sorted, ws, y, st);
  return launch_moe_mt<T, ACT, 2>(p, x, Tn, H, I, E, K, wgu, wd, rw, offsets, sorted, ws, y, st);
}

template <typename T>
static int dispatch_act(int act, const Plan& p, const void* x, int64_t Tn, int H, int I, int E, int K,
                        const void* wgu, const void* wd, const float* rw, const int32_t* offsets,
                        const int32_t* sorted, void* ws, void* y, cudaStream_t st) {
  const T* xt = static_cast<const T*>(x);
  const T* w1 = static_cast<const T*>(wgu);
  const T* w2 = static_cast<const T*>(wd);
  char* w = static_cast<char*>(ws);
  T* yt = static_cast<T*>(y);
  switch (act) {
    case H3MOE_SILU: return launch_moe<T, H3MOE_SILU>(p, xt, Tn, H, I, E, K, w1, w2, rw, offsets, sorted, w, yt, st);
    case H3MOE_GELU: return launch_moe<T, H3MOE_GELU>(p, xt, Tn, H, I, E, K, w1, w2, rw, offsets, sorted, w, yt, st);
    case H3MOE_GELU_TANH: return launch_moe<T, H3MOE_GELU_TANH>(p, xt, Tn, H, I, E, K, w1, w2, rw, offsets, sorted, w, yt, st);
    case H3MOE_RELU: return launch_moe<T, H3MOE_RELU>(p, xt, Tn, H, I, E, K, w1, w2, rw, offsets, sorted, w, yt, st);
    default: return H3MOE_EINVAL;
  }
}

static int check_moe_sizes(int dtype, int64_t T, int H, int I, int E, int K) {
  if (T < 0 || H < 1 || I < 1 || E < 1 || K < 1 || K > E || E > 65535) return H3MOE_EINVAL;
  if (dtype != H3MOE_F16 && dtype != H3MOE_BF16) return H3MOE_EDTYPE;
  if (H % 8 || I % 8) return H3MOE_EALIGN;
  if (T * K > INT32_MAX / 2) return H3MOE_EINVAL;
  return H3MOE_OK;
}

}  // namespace h3moe

using namespace h3moe;

extern "C" size_t h3moe_moe_workspace_bytes(int dtype, int64_t T, int H, int I, int E, int K, int split_k) {
  if (check_moe_sizes(dtype, T, H, I, E, K) != H3MOE_OK) return 0;
  const Plan p = make_plan(2, T, H, I, E, K, split_k);
  return p.act_bytes + p.part_bytes + p.slot_bytes;
}

extern "C" int h3moe_moe_fwd(const void* x, int dtype, int64_t T, int H, int I, int E, int K,
                             const void* w_gate_up, const void* w_down, const float* weights,
                             const int32_t* offsets, const int32_t* sorted_slots, int activation, int split_k,
                             void* workspace, size_t workspace_bytes, void* y, void* stream) {
  const int rc = check_moe_sizes(dtype, T, H, I, E, K);
  if (rc != H3MOE_OK) return rc;
  if (activation < H3MOE_SILU || activation > H3MOE_RELU) return H3MOE_EINVAL;
  if (T == 0) return H3MOE_OK;
  const void* ptrs[] = {x, w_gate_up, w_down, workspace, y};
  for (const void* p : ptrs)
    if (p == nullptr || !aligned16(p)) return H3MOE_EALIGN;
  if (weights == nullptr || offsets == nullptr || sorted_slots == nullptr) return H3MOE_EINVAL;
  const Plan p = make_plan(2, T, H, I, E, K, split_k);
  if (workspace_bytes < p.act_bytes + p.part_bytes + p.slot_bytes) return H3MOE_EWORKSPACE;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == H3MOE_F16)
    return dispatch_act<__half>(activation, p, x, T, H, I, E, K, w_gate_up, w_down, weights, offsets,
                                sorted_slots, workspace, y, st);
  return dispatch_act<__nv_bfloat16>(activation, p, x, T, H, I, E, K, w_gate_up, w_down, weights, offsets,
                                     sorted_slots, workspace, y, st);
}
