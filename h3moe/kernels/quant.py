"""Triton grouped GEMMs over bitsandbytes-packed experts: w4a16 (NF4 / FP4) and w8a16 (LLM.int8 row-wise).

Algorithm (both projections, one launch each):
    Rows are the T*K (token, slot) pairs sorted by expert (Routing.sorted_slots / offsets). Program
    (pid_n, pid_m) finds its expert and row tile by a scalar scan over the E offsets (no host sync, no
    tile map), gathers its BM activation rows, and walks the reduction dimension in steps of BK. Each step
    loads the packed weight tile, dequantizes it in registers (code[q] * absmax, cast to the activation
    dtype: bit-for-bit what bitsandbytes' dequantize_4bit returns) and feeds tl.dot; the dequantized weights
    never reach global memory.
      gate_up: x (T, H) → acc_gate, acc_up (BM, BN) fp32 over H, then act(gate)·up → a (S, I) sorted rows.
      down:    a (S, I) → acc (BM, BN) fp32 over I, times the slot's routing weight → o (T*K, H) fp32 in
               slot order; the combine kernel (kernels/combine.py) sums the K slots (deterministic, no atomics).

Packed layouts (bitsandbytes' own, quantized per expert so expert e's blocks start at its first row):
    4-bit: q (E, N*Kd/2) uint8, flattened row-major (N, Kd) matrix, element 2j in the HIGH nibble of byte j.
           absmax (E, N*Kd/BLOCKSIZE) fp32, or with NESTED (bitsandbytes' compress_statistics) uint8 codes
           into code2 (256,) fp32 scaled by absmax2 (E, ceil(NB/256)) fp32 per 256 blocks plus offset (E,)
           fp32: absmax = code2[u8] * absmax2[blk // 256] + offset[e].
           Value = code[q] * absmax, code the 16-entry NF4 or FP4 table (bitsandbytes.functional.get_4bit_type).
    8-bit: q (E, N, Kd) int8, scale (E, N) fp32 row absmax; value = q * scale * (1/127) (int8_vectorwise).
    Kd is H for gate_up (N = 2I: gate rows, then up rows) and I for down (N = H).

E, H and I are constexpr: one compile per model shape, the loop bounds are static (Triton 3.6's
interpreter cannot run `range` over a runtime scalar with numpy 2.x), the index products fold.
Limits: BLOCKSIZE >= 32 divides Kd (a block lies inside one row; h3moe.quant_moe(backend="auto") sends other
layouts to the per-expert torch path) and BK divides BLOCKSIZE (one absmax per row per K step); Kd % BK == 0
(no K masks). The even/odd split: a 4-bit K step of BK elements is two dots of BK/2,
one over the high nibbles (even k, activations loaded with stride 2) and one over the low nibbles (odd k),
so no in-register interleave is needed.

Decode, T <= GEMV_MAX_T = 16 tokens (by default T=1, and fp32 activations up to 16): GEMV kernels
(w4_gate_up_gemv_kernel, w4_down_gemv_kernel, w8_gate_up_gemv_kernel, w8_down_gemv_kernel; no tl.dot; shared
memory only to broadcast the activation tile, <= 256 B). A program owns one row tile (ROWS <= 8 sorted rows of
one expert), BN output rows and, for down, one of KSPLIT slices of I. Per chunk of 128 columns it issues one
16-byte load per thread per tile (a row of the packed matrix is contiguous; the tile is laid out word-column
first so the compiler keeps those 4 words in one thread) and looks up each nibble's fp32 code by a warp shuffle
(LOOKUP "shfl": lane l holds code[l % 16] in one register, made inside each asm block from the lane's own
%laneid (_shfl_asm: ptxas keeps one copy); shfl.sync.idx reads the low 5 bits of `word >> shift`, so no mask and
no address arithmetic: one SHF and one SHFL per weight), multiplies with the activation row(s) (loaded as one
(BLOCKSIZE/8, NBLK, 8) tile, 8 bytes per thread, split by position within the word), reduces over the block in
registers and applies the block absmax once per block (int8: the row scale once per row, at the end). The next
chunk's words are loaded before the current one is computed (register double buffer). gate_up tiles carry BN
gate rows and the same BN up rows and apply act(gate)*up in the epilogue; down writes KSPLIT fp32 partials
(KSPLIT, T*K, H) that the combine kernel sums with the K slots in one pass (deterministic, no atomics).
Numerics: fp32 codes (bit-for-bit bitsandbytes' table) times activations, the absmax applied to each block's
fp32 sum, fp32 accumulation; the tl.dot path below rounds the weights (code * absmax) to the activation dtype
first: both equal dequantize + reference within bf16/fp16 rounding. LOOKUP "load" (H3MOE_W4_LOOKUP=load, and
always under the interpreter, which cannot run PTX) loads the code from the 16-entry fp32 table instead: same
values, same order, equal outputs up to the compiler's instruction order (GPU test), ~55% more instructions
(64-bit address math per weight).

Why a shuffle (compile tier, sm_90, bf16, T=1, per 1 KB chunk per warp = 32 B per thread): the first GEMV
version looked up each packed BYTE in a 256-entry int64 table of code pairs (2 KB in global memory) — one
LDG.64 per byte, but 32 lanes gathering random entries of 2 KB touch ~14.5 different 128-byte lines, and the
L1 serves one line per wavefront: ~460 L1 cycles per 1 KB chunk, a ceiling near 0.5 TB/s of packed weights per
GPU (132 SMs) whatever the DRAM could give; plus ~390 instructions per chunk (a PRMT, a copy and a mask per
byte for the double buffer, 64-bit table addresses, 32 two-byte activation loads). Now: ~308 instructions per
chunk (64 SHFL + 57 SHF for the lookups, 58 FFMA, 28 IMAD for the bf16 -> fp32 activations, 20 LDS, 6 LDG),
~100 memory-pipe operations (shuffles included) instead of ~460 L1 wavefronts. At one shuffle per clock per SM
that is ~10 B/clk/SM of packed weights: ~2.4 TB/s on an H100 (132 SMs, 1.755 GHz) — about 80% of its measured
3.0 TB/s copy, the issue rate (308 / 4 per clock = 77 clk per KB, 13 B/clk/SM) just above. Registers 127-168,
0-256 B of shared memory, no spills, sm_80 and sm_90 (scripts/kernel_report.py --module h3moe.kernels.quant
--filter gemv --sass).
Tensor-core kernels, fp16 / bf16 activations from 2 tokens on (TC_MIN_T; quant_kernel picks):
w4_gate_up_tc_kernel, w4_down_tc_kernel, and int8's w8_*_tc_kernel (section below): the same words and
shuffles as the GEMV, the codes joined back into element order and fed to the tensor cores with swapped
operands (acc = W · xᵀ: weight rows as wgmma's M=64, the expert's 16-64 rows as N), the block absmax applied
to each K step's fp32 product. Their cost per KB of weights does not grow with the rows at decode (the
GEMV's does, below); at prefill each 64-row tile dequantizes its weights once: ~392 instructions per KB per
64 tokens (sm_90, 8 warps), against ~1000 for the tl.dot kernels above, whose table gathers Triton stages
through ~66 KB of shared memory (sm_90, BM=64, compiled with the run-time 16-byte pointer alignment).
The tl.dot kernels above (BM=16 row tiles for S <= 64, BM=64 beyond) serve fp32 activations above
GEMV_MAX_T and H3MOE_QUANT_KERNEL=dot (they were the 4-bit path at every T > 16 before the tensor-core
kernels; the bench's h3moe:triton-dot rows keep timing them). Their default lookup is the table load; with
H3MOE_W4_LOOKUP=shfl Triton's pipeliner stages neither the gathers nor the activations (it does not follow
loads through inline assembly: 6-30 KB of shared memory, loads waited on in the loop).

Bytes moved per token at decode (K active experts per token, each read once when T*K rows hit distinct
experts; shared experts are read once for all their rows):
    4-bit: K * 3*H*I * (1/2 + 4/BLOCKSIZE)       (nested: 1/2 + 1/BLOCKSIZE + 4/(256*BLOCKSIZE))
    8-bit: K * 3*H*I * 1 + K * (2I + H) * 4      (scales)
    plus activations, per token: K*H*2 (x rows gathered, 16-bit) + K*I*2*2 (a written, then read)
    + KSPLIT*K*H*4*2 (fp32 partials written, then summed) + H*2 (y) — under 0.1% of the weights.
e.g. Mixtral-8x7B (H=4096, I=14336, K=2), NF4, BLOCKSIZE=64: 2*3*4096*14336*0.5625 = 198 MB per token per MoE
layer (nested: 182 MB; int8: 352 MB); at ~3 TB/s (H100, measured copy 2974 GB/s) that is ~66 µs per layer
(int8: ~118 µs). H³Fusion (E=3, H=4096, I=11008): 152 MB, 51 µs; OLMoE (K=8, H=2048, I=1024): 28 MB, 9.5 µs;
Qwen3-30B-A3B (K=8, H=2048, I=768): 21 MB, 7 µs.

Grid at T=1, Mixtral NF4 (pick_decode_config): gate_up BN=8 -> (14336/8, S//1 + min(E, S)) = (1792, 4),
3584 active one-warp programs (2 experts x 1792; the rest leave after the offsets scan), each streaming 8 gate +
8 up rows x 2048 B = 32 KB in 32 chunks of 1 KB; down BN=16, KSPLIT=4 -> (256, 4, 4), 2048 active programs of
16 rows x 1792 B = 28 KB. 127-168 registers -> 12-16 one-warp programs per SM, ~24-32 KB of weight loads in
flight per SM with the double buffer (Little's law at 3 TB/s and ~1 µs: ~23 KB per SM).
int8 (BN=8, one warp, 46-124 registers, no double buffer): ~2.8 instructions per weight (byte extract, LOP3 +
FADD conversion, FFMA; no I2F, whose quarter rate would cap it near 3.7 TB/s), bandwidth-bound.
Rows: every sorted row of a GEMV tile costs ~145 more instructions per 1 KB chunk (64 FFMA for its 64 weights
per thread, ~80 to load, convert and split its activations): `--sass` loop column, gate_up sm_90: 306
(ROWS=1), 450 (2), 736 (4), 1309 (8 rows used). Mixtral at T=16 puts ~4 rows on each expert: ~740 per KB,
issue-bound near 1.3 TB/s, NF4 ~0.6 ms against bf16's measured 0.95 ms (~1.6x, short of the 2.5x target).
Hence the tensor-core decode kernels from 2 tokens on: ~264 instructions per KB per warp whatever the rows
(sm_90, BM=16; 294 at BM=32), an issue ceiling near 15 B/clk/SM (~3.5 TB/s on an H100); the memory pipe
(64 shuffles + ~25 shared / global accesses per KB) near 11.5 B/clk/SM (~2.7 TB/s), about DRAM's. The GEMV
keeps T=1 (306 per KB, but one-warp programs, no shared-memory round trip, no barriers). The bench times the
kernels the default does not take (h3moe:triton-tc at T=1, -gemv at 2-16 tokens, -dot above);
H3MOE_QUANT_KERNEL=tc|gemv|dot forces one.
Prediction for the next GPU session (bench `python -m bench --cases nf4,int8`, whole quant_moe call incl. the
combine launch): T=1 Mixtral NF4 ~0.09-0.12 ms per layer call (66 µs of DRAM at 3 TB/s, ~83 µs at the
shuffle ceiling above; measured before: 0.91 ms with the tl.dot decode tiles), H³Fusion NF4 ~0.07-0.09 ms,
OLMoE / Qwen3 NF4 ~0.03-0.04 ms (launch-bound); T=16 Mixtral NF4 (all 8 experts, 792 MB) ~0.30-0.40 ms
against bf16's 0.95 ms (2.4-3.2x); int8 Mixtral T=1 ~0.13-0.15 ms. If NF4 stays above these with the memory
pipe busy (nsight: MIO throttle), the next lever takes the lookups off the memory pipe: fp16 codes held in 8
registers and picked with PRMT byte permutes, 4 nibbles at a time (~3 integer instructions per nibble, codes
rounded to fp16). A byte-pair table in shared memory would not help: 32 random 8-byte lookups into 2 KB
conflict ~3-4 ways per half warp.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .aot import AotSpec

__all__ = ["w4_gate_up_kernel", "w4_down_kernel", "w8_gate_up_kernel", "w8_down_kernel", "pick_config",
           "aot_specs", "ACT_IDS"]

#: activation name -> constexpr id used by the kernels.
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}

#: 1/127 exactly as bitsandbytes' int8_vectorwise_dequant writes it.
INT8_SCALE = 7.874015718698502e-3


@triton.jit
def _find_tile(offsets_ptr, E, pid_m, BM: tl.constexpr):
    """Scalar scan over the E experts: which expert owns row tile pid_m, and its rows [start, end).
    Returns expert -1 for tiles past the last one (the grid is an upper bound)."""
    found = tl.full([], -1, tl.int32)
    start = tl.full([], 0, tl.int32)
    end = tl.full([], 0, tl.int32)
    tiles = tl.full([], 0, tl.int32)
    lo = tl.load(offsets_ptr)
    for e in range(0, E):
        hi = tl.load(offsets_ptr + e + 1)
        nt = (hi - lo + BM - 1) // BM
        hit = (pid_m >= tiles) & (pid_m < tiles + nt)
        found = tl.where(hit, e, found)
        start = tl.where(hit, lo + (pid_m - tiles) * BM, start)
        end = tl.where(hit, hi, end)
        tiles += nt
        lo = hi
    return found, start, end


@triton.jit
def _find_tile_vec(offsets_ptr, E: tl.constexpr, EP: tl.constexpr, pid_m, BM: tl.constexpr):
    """_find_tile with the E offsets loaded at once (EP = next power of two >= E) and a prefix sum: no chain of
    E dependent scalar loads at the start of every program (E = 128 at decode would cost microseconds)."""
    ee = tl.arange(0, EP)
    lo = tl.load(offsets_ptr + ee, mask=ee < E, other=0)
    hi = tl.load(offsets_ptr + ee + 1, mask=ee < E, other=0)
    nt = (hi - lo + BM - 1) // BM  # (EP,) row tiles per expert, 0 past E
    incl = tl.cumsum(nt, 0)
    hit = (pid_m >= incl - nt) & (pid_m < incl)
    found = tl.max(tl.where(hit, ee, -1), 0)
    start = tl.sum(tl.where(hit, lo + (pid_m - (incl - nt)) * BM, 0), 0)
    end = tl.sum(tl.where(hit, hi, 0), 0)
    return found, start, end


@triton.jit
def _program_tile(offsets_ptr, E: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  N: tl.constexpr, VEC: tl.constexpr):
    """This program's tile (grid axis 0: BN output columns, axis 1: BM-row tiles of the sorted rows): expert e
    (-1 past the last tile: the kernel returns), its rows [start, end) from start, and columns n (BN,) with
    mask_n = n < N. VEC: the vectorized offsets scan (_find_tile_vec, EP >= E a power of two)."""
    if VEC:
        e, start, end = _find_tile_vec(offsets_ptr, E, EP, tl.program_id(1), BM)
    else:
        e, start, end = _find_tile(offsets_ptr, E, tl.program_id(1), BM)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    return e, start, end, n, n < N


@triton.jit
def _act(g, ACT: tl.constexpr):
    # g fp32; ids from ACT_IDS
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u)
        return 0.5 * g * (1.0 + t)
    elif ACT == 3:
        return tl.maximum(g, 0.0)
    else:  # relu2
        r = tl.maximum(g, 0.0)
        return r * r


@triton.jit
def _store_act(out_ptr, acc_g, acc_u, rows_m, mask_m, n, mask_n, I, ACT: tl.constexpr, TRANS: tl.constexpr,
               LIMIT: tl.constexpr = 0.0):
    """gate_up epilogue: act(gate)*up of the (M, BN) fp32 accumulators ((BN, M) when TRANS: the tensor-core
    kernels' swapped operands) into out (S, I) rows rows_m (M,), columns n (BN,), in out's dtype. LIMIT > 0:
    act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT) (swiglu_limit; a constexpr: one compile per model)."""
    if LIMIT > 0.0:
        acc_g = tl.minimum(acc_g, LIMIT, propagate_nan=tl.PropagateNan.ALL)
        acc_u = tl.minimum(tl.maximum(acc_u, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                           propagate_nan=tl.PropagateNan.ALL)
    a = _act(acc_g, ACT) * acc_u
    if TRANS:
        op = out_ptr + rows_m[None, :].to(tl.int64) * I + n[:, None]
        tl.store(op, a.to(out_ptr.dtype.element_ty), mask=mask_m[None, :] & mask_n[:, None])
    else:
        op = out_ptr + rows_m[:, None].to(tl.int64) * I + n[None, :]
        tl.store(op, a.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _store_slots(out_ptr, acc, rows_m, mask_m, n, mask_n, slots_ptr, w_ptr, base, H, TRANS: tl.constexpr):
    """down epilogue: acc (M, BN) fp32 ((BN, M) when TRANS) times each row's routing weight into
    out[base + slot, n] (fp32, slot order; base: the K-split's offset, in rows)."""
    slot = tl.load(slots_ptr + rows_m, mask=mask_m, other=0).to(tl.int64)  # (M,)
    rw = tl.load(w_ptr + slot, mask=mask_m, other=0.0)  # (M,) fp32
    if TRANS:
        op = out_ptr + (base + slot[None, :]) * H + n[:, None]
        tl.store(op, acc * rw[None, :], mask=mask_m[None, :] & mask_n[:, None])
    else:
        op = out_ptr + (base + slot[:, None]) * H + n[None, :]
        tl.store(op, acc * rw[:, None], mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gate_up_halves(acc, BN: tl.constexpr, BM: tl.constexpr):
    """(gate, up), each (BN, BM), of a tensor-core gate_up accumulator (2BN, BM): gate rows, then up rows."""
    return tl.split(tl.permute(tl.reshape(acc, (2, BN, BM)), (1, 2, 0)))


@triton.jit
def _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, blk, mask_n, NB, NB2, NESTED: tl.constexpr):
    """fp32 absmax of blocks blk (BN,) of expert e64 (int64 scalar); bitsandbytes' nested dequant when NESTED."""
    if NESTED:
        qa = tl.load(absmax_ptr + e64 * NB + blk, mask=mask_n, other=0).to(tl.int32)  # (BN,) uint8 codes
        a2 = tl.load(absmax2_ptr + e64 * NB2 + blk // 256, mask=mask_n, other=0.0)  # (BN,) fp32
        off = tl.load(offset_ptr + e64)  # fp32 scalar
        return tl.load(code2_ptr + qa) * a2 + off
    else:
        return tl.load(absmax_ptr + e64 * NB + blk, mask=mask_n, other=0.0)


@triton.jit
def _w4_tile(q_ptr, code_ptr, amax, rows, kh, mask_n, Kd, dtype: tl.constexpr, LOOKUP: tl.constexpr):
    """Dequantize a packed 4-bit tile: rows (BN,) of one expert (q_ptr at its first byte), byte columns kh
    (BK/2,) → (w_even, w_odd) each (BK/2, BN) in dtype (k = 2*kh: high nibble, 2*kh+1: low nibble), code *
    absmax rounded as bitsandbytes does. The codes come from _w4_codes2: LOOKUP 0, warp shuffles (no memory
    access per weight; Triton's pipeliner then stages only the activations in shared memory, ~6-30 KB),
    LOOKUP 1, gathers from the 16-entry table (the pipeliner stages the gathers too: ~100 KB of shared memory,
    1-2 programs per SM; measured 0.22 TB/s of packed weights at BM=16 on an H100)."""
    ptrs = q_ptr + rows[None, :].to(tl.int64) * (Kd // 2) + kh[:, None]
    b = tl.load(ptrs, mask=mask_n[None, :], other=0).to(tl.int32)  # (BK/2, BN) packed bytes
    c_hi, c_lo = _w4_codes2(b, code_ptr, LOOKUP)
    w_hi = (c_hi * amax[None, :]).to(dtype)
    w_lo = (c_lo * amax[None, :]).to(dtype)
    return w_hi, w_lo


@triton.jit
def w4_gate_up_kernel(
    x_ptr,  # (T, H) fp16/bf16/fp32 tokens
    q_ptr,  # (E, 2I*H/2) uint8 packed gate_up, per expert the flattened (2I, H) matrix
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED; NB = 2I*H/BLOCKSIZE
    absmax2_ptr,  # (E, NB2) fp32 nested scales (NESTED only; any pointer otherwise)
    code2_ptr,  # (256,) fp32 nested code (NESTED only)
    offset_ptr,  # (E,) fp32 nested offset (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots: flat slot t*K+k of each sorted row
    offsets_ptr,  # (E+1,) int32 expert row offsets
    out_ptr,  # (S, I) x's dtype: act(gate)*up per sorted row
    NB, NB2,  # i32 absmax blocks per expert, nested scales per expert
    E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, LOOKUP: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, 1, BM, BN, I, False)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)  # (BM,)
    q_e = q_ptr + e64 * I * H  # (2I*H/2) bytes of expert e
    kh = tl.arange(0, BK // 2)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    BPR = H // BLOCKSIZE  # absmax blocks per row
    for k0 in range(0, H, BK):
        xp = x_ptr + tok[:, None] * H + k0 + 2 * kh[None, :]
        x_even = tl.load(xp, mask=mask_m[:, None], other=0.0)  # (BM, BK/2)
        x_odd = tl.load(xp + 1, mask=mask_m[:, None], other=0.0)
        kb = k0 // BLOCKSIZE
        am_g = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n * BPR + kb, mask_n, NB, NB2, NESTED)
        am_u = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, (n + I) * BPR + kb, mask_n, NB, NB2,
                        NESTED)
        wg_hi, wg_lo = _w4_tile(q_e, code_ptr, am_g, n, k0 // 2 + kh, mask_n, H, dtype, LOOKUP)
        wu_hi, wu_lo = _w4_tile(q_e, code_ptr, am_u, n + I, k0 // 2 + kh, mask_n, H, dtype, LOOKUP)
        acc_g = tl.dot(x_even, wg_hi, acc_g, input_precision=DOT_PREC)
        acc_g = tl.dot(x_odd, wg_lo, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(x_even, wu_hi, acc_u, input_precision=DOT_PREC)
        acc_u = tl.dot(x_odd, wu_lo, acc_u, input_precision=DOT_PREC)
    _store_act(out_ptr, acc_g, acc_u, rows_m, mask_m, n, mask_n, I, ACT, False, LIMIT)


@triton.jit
def w4_down_kernel(
    a_ptr,  # (S, I) fp16/bf16/fp32 sorted rows (act(gate)*up)
    q_ptr,  # (E, H*I/2) uint8 packed down, per expert the flattened (H, I) matrix
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED; NB = H*I/BLOCKSIZE
    absmax2_ptr,  # (E, NB2) fp32 (NESTED only)
    code2_ptr,  # (256,) fp32 (NESTED only)
    offset_ptr,  # (E,) fp32 (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weight per flat slot
    out_ptr,  # (T*K, H) fp32: weight * down(a) per slot, slot order
    NB, NB2,  # i32 absmax blocks per expert, nested scales per expert
    E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, LOOKUP: tl.constexpr,
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, 1, BM, BN, H, False)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    q_e = q_ptr + e64 * H * (I // 2)
    kh = tl.arange(0, BK // 2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    BPR = I // BLOCKSIZE
    for k0 in range(0, I, BK):
        ap = a_ptr + rows_m[:, None].to(tl.int64) * I + k0 + 2 * kh[None, :]
        a_even = tl.load(ap, mask=mask_m[:, None], other=0.0)  # (BM, BK/2)
        a_odd = tl.load(ap + 1, mask=mask_m[:, None], other=0.0)
        am = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n * BPR + k0 // BLOCKSIZE, mask_n, NB,
                      NB2, NESTED)
        w_hi, w_lo = _w4_tile(q_e, code_ptr, am, n, k0 // 2 + kh, mask_n, I, dtype, LOOKUP)
        acc = tl.dot(a_even, w_hi, acc, input_precision=DOT_PREC)
        acc = tl.dot(a_odd, w_lo, acc, input_precision=DOT_PREC)
    _store_slots(out_ptr, acc, rows_m, mask_m, n, mask_n, slots_ptr, w_ptr, 0, H, False)


@triton.jit
def _w8_tile(q_ptr, scale, rows, k, mask_n, Kd, dtype: tl.constexpr):
    """Dequantize an int8 tile: rows (BN,), columns k (BK,) → (BK, BN) in dtype, as int8_vectorwise_dequant."""
    b = tl.load(q_ptr + rows[None, :].to(tl.int64) * Kd + k[:, None], mask=mask_n[None, :], other=0)
    return ((b.to(tl.float32) * scale[None, :]) * 7.874015718698502e-3).to(dtype)


@triton.jit
def w8_gate_up_kernel(
    x_ptr,  # (T, H) fp16/bf16/fp32
    q_ptr,  # (E, 2I, H) int8
    scale_ptr,  # (E, 2I) fp32 row absmax
    slots_ptr,  # (S,) int32
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (S, I) x's dtype
    E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, 1, BM, BN, I, False)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)
    q_e = q_ptr + e64 * 2 * I * H
    sg = tl.load(scale_ptr + e64 * 2 * I + n, mask=mask_n, other=0.0)  # (BN,)
    su = tl.load(scale_ptr + e64 * 2 * I + I + n, mask=mask_n, other=0.0)
    kk = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        xt = tl.load(x_ptr + tok[:, None] * H + k0 + kk[None, :], mask=mask_m[:, None], other=0.0)  # (BM, BK)
        wg = _w8_tile(q_e, sg, n, k0 + kk, mask_n, H, dtype)
        wu = _w8_tile(q_e, su, n + I, k0 + kk, mask_n, H, dtype)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
    _store_act(out_ptr, acc_g, acc_u, rows_m, mask_m, n, mask_n, I, ACT, False, LIMIT)


@triton.jit
def w8_down_kernel(
    a_ptr,  # (S, I) fp16/bf16/fp32 sorted rows
    q_ptr,  # (E, H, I) int8
    scale_ptr,  # (E, H) fp32
    slots_ptr,  # (S,) int32
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weights
    out_ptr,  # (T*K, H) fp32 slot order
    E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, 1, BM, BN, H, False)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    q_e = q_ptr + e64 * H * I
    s = tl.load(scale_ptr + e64 * H + n, mask=mask_n, other=0.0)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        at = tl.load(a_ptr + rows_m[:, None].to(tl.int64) * I + k0 + kk[None, :], mask=mask_m[:, None], other=0.0)
        w = _w8_tile(q_e, s, n, k0 + kk, mask_n, I, dtype)
        acc = tl.dot(at, w, acc, input_precision=DOT_PREC)
    _store_slots(out_ptr, acc, rows_m, mask_m, n, mask_n, slots_ptr, w_ptr, 0, H, False)


# ---------------------------------------------------------------------------------------------------------
# Decode GEMV kernels (T <= GEMV_MAX_T tokens: every expert owns at most T <= 16 sorted rows), see the module
# docstring. No tl.dot: a program owns (ROWS-row tile of one expert, BN output rows, one K split), streams its
# packed weight rows with 16-byte loads (a row of the packed matrix is contiguous), turns them into fp32 codes
# once per chunk (4-bit: a shuffle or table lookup per nibble; int8: a conversion) and, for each of its (at most
# ROWS) sorted rows, multiplies with the activation row and reduces over k in registers; the block absmax
# (int8: the row scale) scales the sums. Rows past the expert's count are skipped by a uniform branch.
# Tiles per chunk of BK = NBLK*SUB elements (SUB = min(BLOCKSIZE, 128): one absmax per sub-block, so a large
# blocksize keeps the same tile): 4-bit (SUB/8, NBLK, BN) words, int8 (BN, BK) bytes.

@triton.jit
def _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n, mask, k0, NB, NB2,
             Kd: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NBLK: tl.constexpr,
             SUB: tl.constexpr):
    """Raw chunk of rows n (BN,) of one expert's (N, Kd) matrix (q_e: int32 view at the expert's first byte),
    columns [k0, k0 + NBLK*SUB), SUB = min(BLOCKSIZE, 128) elements per sub-block (one absmax each: SUB divides
    BLOCKSIZE): packed 32-bit words (SUB/8, NBLK, BN) int32, TRANSPOSED (word column first: the compiler gives
    each thread 4 consecutive words of one row, one 16 B load, and the lookups and the k reduction stay in that
    layout) and the sub-blocks' absmax (NBLK, BN) fp32; rows where mask (BN,) is False read as 0. Word c of a
    sub-block holds its elements 8c..8c+7 (see _w4_codes8)."""
    BSW: tl.constexpr = SUB // 8
    j = tl.arange(0, NBLK)
    c = tl.arange(0, BSW)
    rows = n.to(tl.int64)[None, None, :] * (Kd // 8)
    w = tl.load(q_e + rows + k0 // 8 + j[None, :, None] * BSW + c[:, None, None], mask=mask[None, None, :],
                other=0)
    blk = n[None, :] * (Kd // BLOCKSIZE) + (k0 + j[:, None] * SUB) // BLOCKSIZE  # (NBLK, BN)
    am = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, blk, mask[None, :], NB, NB2, NESTED)
    return w, am


def _shfl_asm(shifts: tuple) -> str:
    """PTX for _w4_codes8 / _w4_codes2 (LOOKUP 0): one block that looks up len(shifts) nibbles of its word
    operand $n (n = len(shifts); the code table's address is $n+1) by warp shuffles. The table register is
    made inside the block, from this lane's own %laneid (t = code[laneid & 15], one cache line, read-only):
    a table built outside would be a tensor to Triton, which may move its elements between lanes in a layout
    conversion (it did, in the tensor-core kernels: each lane then shuffled from a table of another lane's
    codes). ptxas keeps one S2R and one LDG.CONSTANT per thread for every block (common subexpressions).
    shfl.sync.idx reads the low 5 bits of its lane operand, so word >> shift needs no mask (bit 4 lands on the
    copy of the table in lanes 16-31)."""
    n = len(shifts)
    lines = ["{", ".reg .b32 l, t, s;", ".reg .b64 a;", "mov.u32 l, %laneid;", "and.b32 l, l, 15;",
             "mul.wide.u32 a, l, 4;", f"add.s64 a, a, ${n + 1};", "ld.global.nc.b32 t, [a];"]
    for i, sh in enumerate(shifts):
        if sh:
            lines += [f"shr.u32 s, ${n}, {sh};", f"shfl.sync.idx.b32 ${i}, t, s, 0x1f, 0xffffffff;"]
        else:
            lines += [f"shfl.sync.idx.b32 ${i}, t, ${n}, 0x1f, 0xffffffff;"]
    return "\n".join(lines + ["}"])


#: Nibble shifts of a packed word's 8 elements in element order (byte i: element 2i high, 2i+1 low nibble),
#: and of one byte's 2.
_SHIFTS8 = (4, 0, 12, 8, 20, 16, 28, 24)
_SHFL8 = tl.constexpr(_shfl_asm(_SHIFTS8))
_SHFL2 = tl.constexpr(_shfl_asm((4, 0)))


@triton.jit
def _w4_codes8(w, code_ptr, LOOKUP: tl.constexpr):
    """fp32 codes of the 8 elements of every packed word w (int32, any shape), in element order 8c+0..8c+7.
    Word c (little-endian) holds packed bytes 4c..4c+3; byte i holds element 2i in its HIGH nibble (bits
    8i+4..8i+7) and element 2i+1 in its low nibble (bits 8i..8i+3). The value is code * absmax, which the
    GEMV applies once per sub-block, after the sub-block's sum.
    LOOKUP 0: warp shuffles from the lane that holds the entry (_shfl_asm: lane l holds code[l % 16]): one SHF
    and one SHFL per weight, no memory access per weight; every lane of the warp runs it (no divergent branch
    around it). LOOKUP 1: a load of the 16-entry table per weight (64 B: one cache line, one L1 wavefront per
    warp load), and the path of Triton's interpreter, which cannot run PTX."""
    if LOOKUP == 0:
        addr = tl.zeros_like(w).to(tl.int64) + code_ptr.to(tl.int64, bitcast=True)
        c = tl.inline_asm_elementwise(_SHFL8, "=r,=r,=r,=r,=r,=r,=r,=r,r,l", [w, addr], dtype=(tl.int32,) * 8,
                                      is_pure=True, pack=1)
        return (c[0].to(tl.float32, bitcast=True), c[1].to(tl.float32, bitcast=True),
                c[2].to(tl.float32, bitcast=True), c[3].to(tl.float32, bitcast=True),
                c[4].to(tl.float32, bitcast=True), c[5].to(tl.float32, bitcast=True),
                c[6].to(tl.float32, bitcast=True), c[7].to(tl.float32, bitcast=True))
    else:
        return (tl.load(code_ptr + ((w >> 4) & 15)), tl.load(code_ptr + (w & 15)),
                tl.load(code_ptr + ((w >> 12) & 15)), tl.load(code_ptr + ((w >> 8) & 15)),
                tl.load(code_ptr + ((w >> 20) & 15)), tl.load(code_ptr + ((w >> 16) & 15)),
                tl.load(code_ptr + ((w >> 28) & 15)), tl.load(code_ptr + ((w >> 24) & 15)))


@triton.jit
def _w4_codes2(b, code_ptr, LOOKUP: tl.constexpr):
    """fp32 codes (high nibble, low nibble) of every packed byte b (int32 in [0, 256), any shape); LOOKUP as
    in _w4_codes8."""
    if LOOKUP == 0:
        addr = tl.zeros_like(b).to(tl.int64) + code_ptr.to(tl.int64, bitcast=True)
        c = tl.inline_asm_elementwise(_SHFL2, "=r,=r,r,l", [b, addr], dtype=(tl.int32, tl.int32), is_pure=True,
                                      pack=1)
        return c[0].to(tl.float32, bitcast=True), c[1].to(tl.float32, bitcast=True)
    else:
        return tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))


@triton.jit
def _rowdot(cs, am, src_ptr, k0, NBLK: tl.constexpr, SUB: tl.constexpr):
    """(BN,) fp32: Σ_k code[k, n] * absmax[k // BLOCKSIZE, n] * src[k0 + k] over the chunk (cs: the 8 code
    tensors of _w4_codes8, am from _w4_load, one per sub-block of SUB elements; src_ptr at the activation row).
    The activations are loaded as one (SUB/8, NBLK, 8) tile (contiguous: vector loads, one per thread at
    SUB=64, NBLK=2) and split by position within the word."""
    j = tl.arange(0, NBLK)
    c = tl.arange(0, SUB // 8)
    p = tl.arange(0, 8)
    xt = tl.load(src_ptr + k0 + j[None, :, None] * SUB + 8 * c[:, None, None] + p[None, None, :])
    xt = tl.reshape(xt.to(tl.float32), (SUB // 8, NBLK, 2, 2, 2))  # [c, j, p >> 2, (p >> 1) & 1, p & 1]
    xe, xo = tl.split(xt)  # p even / odd
    xee, xeo = tl.split(xe)
    xoe, xoo = tl.split(xo)
    x0, x4 = tl.split(xee)
    x2, x6 = tl.split(xeo)
    x1, x5 = tl.split(xoe)
    x3, x7 = tl.split(xoo)
    s = cs[0] * x0[:, :, None]  # one FFMA per weight from here on
    s += cs[1] * x1[:, :, None]
    s += cs[2] * x2[:, :, None]
    s += cs[3] * x3[:, :, None]
    s += cs[4] * x4[:, :, None]
    s += cs[5] * x5[:, :, None]
    s += cs[6] * x6[:, :, None]
    s += cs[7] * x7[:, :, None]
    return tl.sum(tl.sum(s, axis=0) * am, axis=0)


@triton.jit
def _acc_row(acc, p, m: tl.constexpr, ROWS: tl.constexpr):
    """acc (ROWS, BN) with p (BN,) added to row m."""
    if ROWS == 1:
        return acc + p[None, :]
    else:
        return tl.where(tl.arange(0, ROWS)[:, None] == m, acc + p[None, :], acc)


@triton.jit
def w4_gate_up_gemv_kernel(
    x_ptr,  # (T, H) fp16/bf16/fp32 tokens
    q_ptr,  # (E, 2I*H/2) uint8 packed gate_up
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED
    absmax2_ptr,  # (E, NB2) fp32 (NESTED only)
    code2_ptr,  # (256,) fp32 (NESTED only)
    offset_ptr,  # (E,) fp32 (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (S, I) x's dtype: act(gate)*up per sorted row
    NB, NB2,  # i32
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ACT: tl.constexpr,
    ROWS: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, LOOKUP: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, ROWS, BN, I, True)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    q_e = (q_ptr + e64 * I * H).to(tl.pointer_type(tl.int32))  # the expert's 2I*H/2 bytes as words
    acc_g = tl.zeros((ROWS, BN), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BN), dtype=tl.float32)
    SUB: tl.constexpr = 128 if BLOCKSIZE > 128 else BLOCKSIZE  # elements per absmax lookup (a block or part)
    BK: tl.constexpr = NBLK * SUB
    # register double buffer: the next chunk's bytes are in flight while this chunk is computed
    bg, ag = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n, mask_n, 0, NB, NB2, H,
                      BLOCKSIZE, NESTED, NBLK, SUB)
    bu, au = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n + I, mask_n, 0, NB, NB2, H,
                      BLOCKSIZE, NESTED, NBLK, SUB)
    for k0 in range(0, H, BK):
        more = mask_n & (k0 + BK < H)
        bg2, ag2 = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n, more, k0 + BK, NB, NB2,
                            H, BLOCKSIZE, NESTED, NBLK, SUB)
        bu2, au2 = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n + I, more, k0 + BK, NB,
                            NB2, H, BLOCKSIZE, NESTED, NBLK, SUB)
        cg = _w4_codes8(bg, code_ptr, LOOKUP)
        cu = _w4_codes8(bu, code_ptr, LOOKUP)
        for m in tl.static_range(ROWS):
            if start + m < end:
                tok = (tl.load(slots_ptr + start + m) // TOPK).to(tl.int64)
                acc_g = _acc_row(acc_g, _rowdot(cg, ag, x_ptr + tok * H, k0, NBLK, SUB), m, ROWS)
                acc_u = _acc_row(acc_u, _rowdot(cu, au, x_ptr + tok * H, k0, NBLK, SUB), m, ROWS)
        bg, ag, bu, au = bg2, ag2, bu2, au2
    rows_m = start + tl.arange(0, ROWS)
    _store_act(out_ptr, acc_g, acc_u, rows_m, rows_m < end, n, mask_n, I, ACT, False, LIMIT)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["TK"])
def w4_down_gemv_kernel(
    a_ptr,  # (S, I) fp16/bf16/fp32 sorted rows
    q_ptr,  # (E, H*I/2) uint8 packed down
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED
    absmax2_ptr,  # (E, NB2) fp32 (NESTED only)
    code2_ptr,  # (256,) fp32 (NESTED only)
    offset_ptr,  # (E,) fp32 (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weight per flat slot
    out_ptr,  # (KSPLIT, T*K, H) fp32: weight * (split ks's part of down(a)) per slot, slot order
    NB, NB2, TK,  # i32; TK = T*K slots
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    ROWS: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, KSPLIT: tl.constexpr, LOOKUP: tl.constexpr,
):
    ks = tl.program_id(2)
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, ROWS, BN, H, True)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    q_e = (q_ptr + e64 * H * (I // 2)).to(tl.pointer_type(tl.int32))  # the expert's H*I/2 bytes as words
    acc = tl.zeros((ROWS, BN), dtype=tl.float32)
    KC: tl.constexpr = I // KSPLIT
    SUB: tl.constexpr = 128 if BLOCKSIZE > 128 else BLOCKSIZE  # elements per absmax lookup (a block or part)
    BK: tl.constexpr = NBLK * SUB
    b, am = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n, mask_n, ks * KC, NB, NB2, I,
                     BLOCKSIZE, NESTED, NBLK, SUB)
    for kc in range(0, KC, BK):
        k0 = ks * KC + kc
        b2, am2 = _w4_load(q_e, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n, mask_n & (kc + BK < KC),
                           k0 + BK, NB, NB2, I, BLOCKSIZE, NESTED, NBLK, SUB)
        cw = _w4_codes8(b, code_ptr, LOOKUP)
        for m in tl.static_range(ROWS):
            if start + m < end:
                acc = _acc_row(acc, _rowdot(cw, am, a_ptr + (start + m).to(tl.int64) * I, k0, NBLK, SUB), m,
                               ROWS)
        b, am = b2, am2
    rows_m = start + tl.arange(0, ROWS)
    _store_slots(out_ptr, acc, rows_m, rows_m < end, n, mask_n, slots_ptr, w_ptr, ks * TK, H, False)


@triton.jit
def _i8_biased(v):
    """fp32 2^23 + 128 + b for the signed byte b in the low 8 bits of v (int32), without I2F (a quarter-rate
    instruction on sm_80/sm_90: one per weight would cap the GEMV near 16 B/clk/SM, ~3.7 TB/s on an H100,
    below an H200's bandwidth): b offset to b + 128 by flipping its top bit is the low mantissa of
    2^23 + b + 128 (exponent bits 0x4B): one LOP3; subtracting 8388736.0 (one FADD) leaves b exactly."""
    return ((v & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)  # 0x4B000000 | (b + 128)


@triton.jit
def _w8_chunk(q_e, n, mask_n, k0, Kd: tl.constexpr, BK: tl.constexpr):
    """(BN, BK) fp32 int8 values of rows n, columns [k0, k0 + BK) (_i8_biased, less the bias)."""
    kk = tl.arange(0, BK)
    b = tl.load(q_e + n.to(tl.int64)[:, None] * Kd + k0 + kk[None, :], mask=mask_n[:, None], other=0)
    return _i8_biased(b.to(tl.int32)) - 8388736.0


@triton.jit
def _rowdot8(w, src_ptr, k0, BK: tl.constexpr):
    """(BN,) fp32 Σ_k q[n, k] * src[k0 + k]; the caller applies the row scale * (1/127) once at the end."""
    xv = tl.load(src_ptr + k0 + tl.arange(0, BK)).to(tl.float32)  # (BK,)
    return tl.sum(w * xv[None, :], axis=1)


@triton.jit
def w8_gate_up_gemv_kernel(
    x_ptr,  # (T, H) fp16/bf16/fp32
    q_ptr,  # (E, 2I, H) int8
    scale_ptr,  # (E, 2I) fp32 row absmax
    slots_ptr,  # (S,) int32
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (S, I) x's dtype
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, ACT: tl.constexpr,
    ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, ROWS, BN, I, True)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    q_e = q_ptr + e64 * 2 * I * H
    sg = tl.load(scale_ptr + e64 * 2 * I + n, mask=mask_n, other=0.0)  # (BN,)
    su = tl.load(scale_ptr + e64 * 2 * I + I + n, mask=mask_n, other=0.0)
    acc_g = tl.zeros((ROWS, BN), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        wg = _w8_chunk(q_e, n, mask_n, k0, H, BK)
        wu = _w8_chunk(q_e, n + I, mask_n, k0, H, BK)
        for m in tl.static_range(ROWS):
            if start + m < end:
                tok = (tl.load(slots_ptr + start + m) // TOPK).to(tl.int64)
                acc_g = _acc_row(acc_g, _rowdot8(wg, x_ptr + tok * H, k0, BK), m, ROWS)
                acc_u = _acc_row(acc_u, _rowdot8(wu, x_ptr + tok * H, k0, BK), m, ROWS)
    rows_m = start + tl.arange(0, ROWS)
    _store_act(out_ptr, acc_g * (sg * 7.874015718698502e-3)[None, :], acc_u * (su * 7.874015718698502e-3)[None, :],
               rows_m, rows_m < end, n, mask_n, I, ACT, False, LIMIT)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["TK"])
def w8_down_gemv_kernel(
    a_ptr,  # (S, I) fp16/bf16/fp32 sorted rows
    q_ptr,  # (E, H, I) int8
    scale_ptr,  # (E, H) fp32
    slots_ptr,  # (S,) int32
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weights
    out_ptr,  # (KSPLIT, T*K, H) fp32 slot order
    TK,  # i32 T*K
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
):
    ks = tl.program_id(2)
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, ROWS, BN, H, True)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    q_e = q_ptr + e64 * H * I
    s = tl.load(scale_ptr + e64 * H + n, mask=mask_n, other=0.0)
    acc = tl.zeros((ROWS, BN), dtype=tl.float32)
    KC: tl.constexpr = I // KSPLIT
    for kc in range(0, KC, BK):
        k0 = ks * KC + kc
        w = _w8_chunk(q_e, n, mask_n, k0, I, BK)
        for m in tl.static_range(ROWS):
            if start + m < end:
                acc = _acc_row(acc, _rowdot8(w, a_ptr + (start + m).to(tl.int64) * I, k0, BK), m, ROWS)
    rows_m = start + tl.arange(0, ROWS)
    _store_slots(out_ptr, acc * (s * 7.874015718698502e-3)[None, :], rows_m, rows_m < end, n, mask_n, slots_ptr,
                 w_ptr, ks * TK, H, False)


# ---------------------------------------------------------------------------------------------------------
# Tensor-core kernels (fp16 / bf16 activations, TC_MIN_T <= T <= TC_MAX_T): the GEMV's cost grows by
# ~145 instructions per 1 KB chunk with every row an expert serves; a tensor core's does not. Swapped operands
# (acc = W · xᵀ): the dequantized weight tile is the MMA's A operand (M = weight rows: wgmma's M=64 per warp
# group), the program's BM sorted rows (tokens) its N (16-64; wgmma takes N in steps of 8). One K step is one
# absmax sub-block of SUB = min(BLOCKSIZE, 64) elements (SUB/8 words per row): the codes go into the dot in
# the activation dtype and the block's absmax multiplies the step's (rows, BM) fp32 product (one FFMA per
# SUB/BM weights, not one per weight). Words come in as int32, DEPTH (1-2) K steps ahead in a register ring
# written by hand (Triton's pipeliner stages no load whose consumer is inline assembly; at 4 CTAs per SM, two
# steps keep ~32 KB of weight loads in flight per SM), and each nibble's code by one shuffle (LOOKUP 0)
# or one table load (LOOKUP 1); the 8 code tensors of a word are joined back into element order
# (_w4_codes_tile), so the activations load contiguous. gate_up stacks its BN gate rows and BN up rows into
# one (2BN, SUB) A tile: one dot per step.
# Numerics: code rounded to the activation dtype, times the absmax in fp32 after the block's dot (bitsandbytes
# rounds code * absmax once): equal to dequantize + reference within a bf16 / fp16 ulp per weight.
# Compile tier (sm_90, bf16, BM=16, BN=64, SUB=64, DEPTH=2, 4 warps): ~264 SASS instructions per 1 KB of
# packed weights per warp (64 SHFL + 56 SHF + 32 F2FP for the codes, ~16 FFMA for the absmax, one STS/LDSM
# round trip of the A tile, 8 HGMMA), whatever the rows: the GEMV needs 306 (1 row), 450 (2), 736 (4), 1309 (8).
# int8 (w8_gate_up_tc_kernel, w8_down_tc_kernel): the same tiles over int8 rows read as words (4 bytes each),
# each byte to fp32 without I2F (_w8_chunk's trick), exact in fp16 / bf16, the row scale in the epilogue (the
# dots chain in the accumulator): ~165 instructions per KB per warp (GEMV: 181 at 1 row, 253 at 2, 398 at 4,
# 687 at 8).

@triton.jit
def _w4_codes_tile(w, code_ptr, dtype: tl.constexpr, LOOKUP: tl.constexpr):
    """(R, 8*W) codes in dtype of packed words w (R, W) int32, in element order: column 8c + p is element p of
    word c (_w4_codes8's order: byte p // 2, high nibble for even p). Each join appends a dimension of 2 after
    the previous ones, so pairing positions 4 apart first, then 2, then 1 gives [r, c, p2, p1, p0] with
    p = 4*p2 + 2*p1 + p0: flattened, element order (the joined dimensions live in one thread's registers)."""
    cs = _w4_codes8(w, code_ptr, LOOKUP)
    j = tl.join(tl.join(tl.join(cs[0].to(dtype), cs[4].to(dtype)), tl.join(cs[2].to(dtype), cs[6].to(dtype))),
                tl.join(tl.join(cs[1].to(dtype), cs[5].to(dtype)), tl.join(cs[3].to(dtype), cs[7].to(dtype))))
    return tl.reshape(j, (w.shape[0], 8 * w.shape[1]))


@triton.jit
def w4_gate_up_tc_kernel(
    x_ptr,  # (T, H) fp16/bf16 tokens
    q_ptr,  # (E, 2I*H/2) uint8 packed gate_up (4-byte aligned: read as int32 words)
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED
    absmax2_ptr,  # (E, NB2) fp32 (NESTED only)
    code2_ptr,  # (256,) fp32 (NESTED only)
    offset_ptr,  # (E,) fp32 (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (S, I) x's dtype: act(gate)*up per sorted row
    NB, NB2,  # i32
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, LOOKUP: tl.constexpr, DEPTH: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, BM, BN, I, True)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)
    q_e = (q_ptr + e64 * I * H).to(tl.pointer_type(tl.int32))  # the expert's 2I*H/2 bytes as words
    SUB: tl.constexpr = 64 if BLOCKSIZE > 64 else BLOCKSIZE  # K step: one absmax (sub-)block
    r = tl.arange(0, 2 * BN)
    nr = tl.program_id(0) * BN + r % BN  # (2BN,) gate rows n, then the same up rows
    mask_r = nr < I
    row = nr + (r // BN) * I  # (2BN,) row of the (2I, H) matrix
    pw = q_e + row.to(tl.int64)[:, None] * (H // 8) + tl.arange(0, SUB // 8)[None, :]  # (2BN, SUB/8)
    xp = x_ptr + tok[None, :] * H + tl.arange(0, SUB)[:, None]  # (SUB, BM): xᵀ
    acc = tl.zeros((2 * BN, BM), dtype=tl.float32)
    w = tl.load(pw, mask=mask_r[:, None], other=0)
    if DEPTH == 2:
        w2 = tl.load(pw + SUB // 8, mask=mask_r[:, None] & (SUB < H), other=0)
        xt = tl.load(xp, mask=mask_m[None, :], other=0.0)  # (SUB, BM)
    for k0 in range(0, H, SUB):
        # the words DEPTH steps ahead (a register ring by hand: the pipeliner stages nothing behind inline asm)
        wn = tl.load(pw + (k0 + DEPTH * SUB) // 8, mask=mask_r[:, None] & (k0 + DEPTH * SUB < H), other=0)
        if DEPTH == 2:  # the activations one step ahead by hand too (the pipeliner then leaves them alone)
            xn = tl.load(xp + k0 + SUB, mask=mask_m[None, :] & (k0 + SUB < H), other=0.0)
        else:  # staged by the pipeliner (cp.async): fewer registers
            xt = tl.load(xp + k0, mask=mask_m[None, :], other=0.0)
        am = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, row * (H // BLOCKSIZE) + k0 // BLOCKSIZE,
                      mask_r, NB, NB2, NESTED)  # (2BN,)
        acc += tl.dot(_w4_codes_tile(w, code_ptr, dtype, LOOKUP), xt) * am[:, None]
        if DEPTH == 2:
            w, w2, xt = w2, wn, xn
        else:
            w = wn
    acc_g, acc_u = _gate_up_halves(acc, BN, BM)  # (BN, BM) each
    _store_act(out_ptr, acc_g, acc_u, rows_m, mask_m, n, mask_n, I, ACT, True, LIMIT)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["TK"])
def w4_down_tc_kernel(
    a_ptr,  # (S, I) fp16/bf16 sorted rows
    q_ptr,  # (E, H*I/2) uint8 packed down (4-byte aligned)
    absmax_ptr,  # (E, NB) fp32, or uint8 when NESTED
    absmax2_ptr,  # (E, NB2) fp32 (NESTED only)
    code2_ptr,  # (256,) fp32 (NESTED only)
    offset_ptr,  # (E,) fp32 (NESTED only)
    code_ptr,  # (16,) fp32 NF4 / FP4 table
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weight per flat slot
    out_ptr,  # (KSPLIT, T*K, H) fp32: weight * (split ks's part of down(a)) per slot, slot order
    NB, NB2, TK,  # i32; TK = T*K slots
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KSPLIT: tl.constexpr, LOOKUP: tl.constexpr, DEPTH: tl.constexpr,
):
    ks = tl.program_id(2)
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, BM, BN, H, True)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    q_e = (q_ptr + e64 * H * (I // 2)).to(tl.pointer_type(tl.int32))  # the expert's H*I/2 bytes as words
    SUB: tl.constexpr = 64 if BLOCKSIZE > 64 else BLOCKSIZE
    KC: tl.constexpr = I // KSPLIT  # this split's columns [ks*KC, (ks+1)*KC)
    k_lo = ks * KC
    pw = q_e + n.to(tl.int64)[:, None] * (I // 8) + tl.arange(0, SUB // 8)[None, :]  # (BN, SUB/8)
    ap = a_ptr + rows_m[None, :].to(tl.int64) * I + tl.arange(0, SUB)[:, None]  # (SUB, BM): aᵀ
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    w = tl.load(pw + k_lo // 8, mask=mask_n[:, None], other=0)
    if DEPTH == 2:
        w2 = tl.load(pw + (k_lo + SUB) // 8, mask=mask_n[:, None] & (SUB < KC), other=0)
        at = tl.load(ap + k_lo, mask=mask_m[None, :], other=0.0)  # (SUB, BM)
    for kc in range(0, KC, SUB):
        k0 = k_lo + kc
        wn = tl.load(pw + (k0 + DEPTH * SUB) // 8, mask=mask_n[:, None] & (kc + DEPTH * SUB < KC), other=0)
        if DEPTH == 2:
            an = tl.load(ap + k0 + SUB, mask=mask_m[None, :] & (kc + SUB < KC), other=0.0)
        else:
            at = tl.load(ap + k0, mask=mask_m[None, :], other=0.0)
        am = _absmax4(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e64, n * (I // BLOCKSIZE) + k0 // BLOCKSIZE,
                      mask_n, NB, NB2, NESTED)  # (BN,)
        acc += tl.dot(_w4_codes_tile(w, code_ptr, dtype, LOOKUP), at) * am[:, None]
        if DEPTH == 2:
            w, w2, at = w2, wn, an
        else:
            w = wn
    _store_slots(out_ptr, acc, rows_m, mask_m, n, mask_n, slots_ptr, w_ptr, ks * TK, H, True)


@triton.jit
def _w8_codes_tile(w, dtype: tl.constexpr):
    """(R, 4*W) int8 values in dtype (exact: |q| <= 128) of words w (R, W) int32 (byte i of word c = element
    4c + i), in element order: each byte to fp32 without I2F (_i8_biased), joined positions 2 apart first,
    then 1 ([r, c, p1, p0], p = 2*p1 + p0), the bias taken off once after the join."""
    v0, v1, v2, v3 = _i8_biased(w), _i8_biased(w >> 8), _i8_biased(w >> 16), _i8_biased(w >> 24)
    j = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (w.shape[0], 4 * w.shape[1]))
    return (j - 8388736.0).to(dtype)


@triton.jit
def w8_gate_up_tc_kernel(
    x_ptr,  # (T, H) fp16/bf16 tokens
    q_ptr,  # (E, 2I, H) int8 (4-byte aligned: read as int32 words)
    scale_ptr,  # (E, 2I) fp32 row absmax
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (S, I) x's dtype: act(gate)*up per sorted row
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    TOPK: tl.constexpr, ACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, DEPTH: tl.constexpr,
    LIMIT: tl.constexpr = 0.0,  # > 0: the clamped SwiGLU act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
):
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, BM, BN, I, True)  # n: gate rows, up: n + I
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)
    q_e = (q_ptr + e64 * 2 * I * H).to(tl.pointer_type(tl.int32))  # the expert's (2I, H) bytes as words
    r = tl.arange(0, 2 * BN)
    nr = tl.program_id(0) * BN + r % BN  # (2BN,) gate rows n, then the same up rows
    mask_r = nr < I
    row = nr + (r // BN) * I
    pw = q_e + row.to(tl.int64)[:, None] * (H // 4) + tl.arange(0, SUB // 4)[None, :]  # (2BN, SUB/4)
    xp = x_ptr + tok[None, :] * H + tl.arange(0, SUB)[:, None]  # (SUB, BM): xᵀ
    acc = tl.zeros((2 * BN, BM), dtype=tl.float32)
    w = tl.load(pw, mask=mask_r[:, None], other=0)
    if DEPTH == 2:
        w2 = tl.load(pw + SUB // 4, mask=mask_r[:, None] & (SUB < H), other=0)
        xt = tl.load(xp, mask=mask_m[None, :], other=0.0)  # (SUB, BM)
    for k0 in range(0, H, SUB):
        wn = tl.load(pw + (k0 + DEPTH * SUB) // 4, mask=mask_r[:, None] & (k0 + DEPTH * SUB < H), other=0)
        if DEPTH == 2:
            xn = tl.load(xp + k0 + SUB, mask=mask_m[None, :] & (k0 + SUB < H), other=0.0)
        else:
            xt = tl.load(xp + k0, mask=mask_m[None, :], other=0.0)
        acc = tl.dot(_w8_codes_tile(w, dtype), xt, acc)
        if DEPTH == 2:
            w, w2, xt = w2, wn, xn
        else:
            w = wn
    sc = tl.load(scale_ptr + e64 * 2 * I + row, mask=mask_r, other=0.0) * 7.874015718698502e-3  # (2BN,)
    acc = acc * sc[:, None]
    acc_g, acc_u = _gate_up_halves(acc, BN, BM)  # (BN, BM) each
    _store_act(out_ptr, acc_g, acc_u, rows_m, mask_m, n, mask_n, I, ACT, True, LIMIT)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["TK"])
def w8_down_tc_kernel(
    a_ptr,  # (S, I) fp16/bf16 sorted rows
    q_ptr,  # (E, H, I) int8 (4-byte aligned)
    scale_ptr,  # (E, H) fp32
    slots_ptr,  # (S,) int32
    offsets_ptr,  # (E+1,) int32
    w_ptr,  # (T*K,) fp32 routing weights
    out_ptr,  # (KSPLIT, T*K, H) fp32 slot order
    TK,  # i32 T*K
    E: tl.constexpr, EP: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, KSPLIT: tl.constexpr, DEPTH: tl.constexpr,
):
    ks = tl.program_id(2)
    e, start, end, n, mask_n = _program_tile(offsets_ptr, E, EP, BM, BN, H, True)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    q_e = (q_ptr + e64 * H * I).to(tl.pointer_type(tl.int32))
    KC: tl.constexpr = I // KSPLIT
    k_lo = ks * KC
    pw = q_e + n.to(tl.int64)[:, None] * (I // 4) + tl.arange(0, SUB // 4)[None, :]  # (BN, SUB/4)
    ap = a_ptr + rows_m[None, :].to(tl.int64) * I + tl.arange(0, SUB)[:, None]  # (SUB, BM): aᵀ
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    w = tl.load(pw + k_lo // 4, mask=mask_n[:, None], other=0)
    if DEPTH == 2:
        w2 = tl.load(pw + (k_lo + SUB) // 4, mask=mask_n[:, None] & (SUB < KC), other=0)
        at = tl.load(ap + k_lo, mask=mask_m[None, :], other=0.0)  # (SUB, BM)
    for kc in range(0, KC, SUB):
        k0 = k_lo + kc
        wn = tl.load(pw + (k0 + DEPTH * SUB) // 4, mask=mask_n[:, None] & (kc + DEPTH * SUB < KC), other=0)
        if DEPTH == 2:
            an = tl.load(ap + k0 + SUB, mask=mask_m[None, :] & (kc + SUB < KC), other=0.0)
        else:
            at = tl.load(ap + k0, mask=mask_m[None, :], other=0.0)
        acc = tl.dot(_w8_codes_tile(w, dtype), at, acc)
        if DEPTH == 2:
            w, w2, at = w2, wn, an
        else:
            w = wn
    sc = tl.load(scale_ptr + e64 * H + n, mask=mask_n, other=0.0) * 7.874015718698502e-3  # (BN,)
    _store_slots(out_ptr, acc * sc[:, None], rows_m, mask_m, n, mask_n, slots_ptr, w_ptr, ks * TK, H, True)


# ---------------------------------------------------------------------------------------------------------
# Configurations. No autotuning: a config is picked from S = T*K and the layer shape, so the compile tier
# sees every variant (pick_decode_config below for the GEMV kernels, T <= 16). tl.dot "decode" (S <= 64 with
# T > 16 tokens): BM=16 (the smallest tl.dot M), one row tile per active expert, every
# weight byte of an active expert read once, 4 stages of loads in flight; BN=32 when the output width N is
# small (down: N = H) so that a single token still launches >= 2 programs per SM (H=4096, K=2: 256), BN=64
# otherwise (gate_up: N = I, and each program covers BN gate + BN up rows). prefill: BM=64, more reuse per
# weight tile (wgmma on sm_90). 8 warps: with 4, the dequantized tiles spill (cuobjdump STACK > 0 on sm_80 and
# sm_90). BK: 64 elements (32 packed bytes per row = one 32 B sector) for 4-bit, bounded by BLOCKSIZE; int8
# tiles are twice the bytes: BK=128 spills, BK=64 spills at BM=64 on sm_80, so 64 (decode) / 32 (prefill).
# fp32 activations (DOT_PREC "ieee": FMA, not tensor cores, each thread holds its rows' whole BK slice of the
# operands): 4-bit BK=32, where BK=64 spilled 170-400 bytes at BM=64 (sm_80 and sm_90, both lookups).

DECODE_MAX_ROWS = 64


def pick_config(S: int, bits: int, blocksize: int, Kd: int, N: int, fp32: bool = False) -> dict:
    """Tile sizes for S sorted rows, reduction length Kd (H for gate_up, I for down) and output width N
    (I for gate_up, H for down); fp32: fp32 activations."""
    decode = S <= DECODE_MAX_ROWS
    if bits == 4:
        bk = min(32 if fp32 else 64, blocksize)
    else:
        bk = 64 if decode and Kd % 64 == 0 else 32
    if decode:
        bn = 64 if N >= 8192 else 32
        return {"BM": 16, "BN": bn, "BK": bk, "num_warps": 8 if bn == 64 else 4, "num_stages": 4}
    return {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8, "num_stages": 3}


#: The GEMV decode kernels run when T <= GEMV_MAX_T (an expert then owns at most T sorted rows).
#: H3MOE_QUANT_GEMV_MAX_T=0 turns them off (every T takes the tl.dot kernels, measured correct on an H100
#: 2026-11-27); the GEMV kernels were checked in the interpreter and the compile tier, not yet on a GPU.
GEMV_MAX_T = min(16, int(os.environ.get("H3MOE_QUANT_GEMV_MAX_T", "16")))
#: How the 4-bit kernels look up a nibble's code (constexpr LOOKUP): "shfl", a warp shuffle from a table held
#: in one register per lane, or "load", a load from the 16-entry table (the only path Triton's interpreter can
#: run: it cannot execute PTX). Defaults per kernel (W4_DEFAULT_LOOKUP): the GEMV decode kernels shuffle; the
#: tl.dot kernels load (there Triton's pipeliner stages the table gathers and the activations in shared memory;
#: with the shuffle it stages neither, so the loop waits on its loads: which is faster is for a GPU to say, the
#: bench times both). H3MOE_W4_LOOKUP=shfl|load forces one lookup on every 4-bit kernel.
W4_LOOKUP_IDS = {"shfl": 0, "load": 1}
W4_DEFAULT_LOOKUP = {"gemv": "shfl", "tc": "shfl", "dot": "load"}


def w4_lookup(kernel: str, interpret: bool) -> str:
    """The lookup in effect for kernel "gemv", "tc" or "dot": "load" under the interpreter, else H3MOE_W4_LOOKUP if
    set, else W4_DEFAULT_LOOKUP[kernel]."""
    if interpret:
        return "load"
    mode = os.environ.get("H3MOE_W4_LOOKUP") or W4_DEFAULT_LOOKUP[kernel]
    if mode not in W4_LOOKUP_IDS:
        raise ValueError(f"H3MOE_W4_LOOKUP: expected one of {sorted(W4_LOOKUP_IDS)}, got {mode!r}")
    return mode


def default_w4_lookup(T: int, half: bool = True) -> str:
    """The lookup a 4-bit quant_moe call over T tokens runs by default (quant_kernel picks the kernel kind)."""
    return W4_DEFAULT_LOOKUP[quant_kernel(T, half)]


#: The tensor-core kernels (w4_*_tc_kernel, w8_*_tc_kernel) serve fp16 / bf16 activations at
#: TC_MIN_T <= T <= TC_MAX_T tokens (no upper bound by default). T=1 stays on the GEMV (one row per expert: 306
#: instructions per KB against the 4-bit tensor-core kernel's ~264, int8 181 against 165, but no shared-memory
#: round trip and one-warp programs; the bench's h3moe:triton-tc row at T=1 times the other kernel so a GPU
#: decides). H3MOE_QUANT_TC_MAX_T=0 turns them off (the GEMV up to GEMV_MAX_T, then the tl.dot kernels),
#: H3MOE_QUANT_TC_MAX_T=64 keeps them to decode, H3MOE_QUANT_TC_MIN_T=1 sends T=1 to them too.
TC_MIN_T = int(os.environ.get("H3MOE_QUANT_TC_MIN_T", "2"))
TC_MAX_T = int(os.environ.get("H3MOE_QUANT_TC_MAX_T", str(2**62)))
#: Active programs the tensor-core kernels aim for (2-4 per SM by registers on 132 SMs, about two waves): the
#: down projection is split over its reduction (I) until it has this many.
TC_TARGET_PROGRAMS = 1024


#: Values of H3MOE_QUANT_KERNEL, read at every call (the bench's h3moe:triton-tc / -gemv / -dot rows set it
#: around one call): "tc" sends every fp16 / bf16 call to the tensor-core kernels whatever T (T=1 included),
#: "gemv" keeps the GEMV up to GEMV_MAX_T (then tl.dot), "dot" the tl.dot kernels at any T;
#: unset: TC_MIN_T, TC_MAX_T and GEMV_MAX_T decide.
QUANT_KERNEL_MODES = ("tc", "gemv", "dot")


def quant_kernel(T: int, half: bool) -> str:
    """Which kernels a quant_moe call over T tokens runs (4-bit and int8 alike): "tc" (the tensor-core kernels;
    half: fp16 / bf16 activations), "gemv" (T <= GEMV_MAX_T) or "dot" (the tl.dot kernels)."""
    force = os.environ.get("H3MOE_QUANT_KERNEL") or None
    if force is not None and force not in QUANT_KERNEL_MODES:
        raise ValueError(f"H3MOE_QUANT_KERNEL: expected one of {list(QUANT_KERNEL_MODES)}, got {force!r}")
    if half and (force == "tc" or (force is None and TC_MIN_T <= T <= TC_MAX_T)):
        return "tc"
    return "gemv" if T <= GEMV_MAX_T and force != "dot" else "dot"


def pick_tc_config(T: int, S: int, E: int, bits: int, blocksize: int, Kd: int, N: int, proj: str,
                   arch: int = 90) -> dict:
    """Tensor-core tiles for T tokens, S = T*K sorted rows, bits 4 or 8, reduction length Kd, output width N,
    proj "gate_up" or "down", on sm_<arch>.

    BM (tokens per row tile, the MMA's N): the power of two >= 1.5x the mean rows per active expert (S over
    min(E, S)), at most T, within [16, 64]: an expert with more rows than BM gets another tile (its weights
    read again: prefill dequantizes each weight once per 64 rows). BN weight rows per program: gate_up BN = 64
    gate + 64 up rows (a 128-row A tile), down BN = 128 rows. 4 warps (one warp group) up to BM = 32, 8 at
    BM = 64 (two warp groups: 124-127 registers, ~392 instructions per KB per warp on sm_90; BM=128 would
    need ~200 registers, one program per SM). SUB, the K step: 4-bit one absmax (sub-)block, min(BLOCKSIZE,
    64); int8 64 where Kd allows, else 32. KSPLIT (down): the smallest power of two <= 8 dividing Kd into
    whole SUB-element steps with cdiv(N, BN) * (row tiles: S // BM + min(E, S)) * KSPLIT >= TC_TARGET_PROGRAMS.
    DEPTH, the K steps of words in flight: 2 at BM = 16 on sm_90+ (decode: bandwidth-bound; 128 registers,
    the activations then prefetched by hand too; sm_80's ptxas spills 8 B there, so 1), 1 above (the
    pipeliner stages the activations, 3 stages; a second step of words costs registers, hence programs per
    SM, where the issue rate is the limit); H3MOE_QUANT_TC_DEPTH=1|2 overrides it (read per call, for the
    GPU to compare)."""
    mean = S / max(1, min(E, S))
    bm = 16
    while bm < 64 and bm < min(T, 1.5 * mean):
        bm *= 2
    bn = 64 if proj == "gate_up" else 128
    sub = min(blocksize, 64) if bits == 4 else (64 if Kd % 64 == 0 else 32)
    ks = 1
    if proj == "down":
        programs = -(-N // bn) * (S // bm + min(E, S))
        while ks < 8 and programs * ks < TC_TARGET_PROGRAMS and Kd % (2 * ks * sub) == 0:
            ks *= 2
    depth = int(os.environ.get("H3MOE_QUANT_TC_DEPTH") or (2 if bm == 16 and arch >= 90 else 1))
    if depth not in (1, 2):
        raise ValueError(f"H3MOE_QUANT_TC_DEPTH: expected 1 or 2, got {depth}")
    return {"BM": bm, "BN": bn, "SUB": sub, "KSPLIT": ks, "DEPTH": depth, "num_warps": 8 if bm == 64 else 4,
            "num_stages": 3}


#: Rows of one expert a GEMV program serves (the row loop is unrolled).
GEMV_ROWS = 8
#: Active programs the decode path aims for (H100: 132 SMs; ~16 small CTAs per SM keep ~20 KB of loads in
#: flight per SM): the down projection is split over its reduction (I) until it reaches this many.
GEMV_TARGET_PROGRAMS = 2048


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_decode_config(T: int, S: int, E: int, bits: int, blocksize: int, Kd: int, N: int, proj: str) -> dict:
    """GEMV tile sizes for T <= GEMV_MAX_T tokens, S = T*K sorted rows, reduction length Kd, output width N,
    proj "gate_up" (no K split: its epilogue needs the whole reduction) or "down".

    ROWS = next power of two >= T, at most GEMV_ROWS (an expert owns at most T rows: one row tile per active
    expert up to T = 8; at 8 < T <= 16 an expert with more than 8 rows gets two tiles, so its weights are read
    twice, rather than a 16-row unrolled loop that spills).
    4-bit: one warp per program, chunks of BK = NBLK*SUB = 128 elements (64 packed bytes per row) when Kd
    allows, SUB = min(BLOCKSIZE, 128) (the kernels' sub-block: a block of 32 or 64, or a 128-element part of a
    larger block, so that a blocksize of 256-4096 keeps the same tile); BN = 8 gate + 8 up rows (gate_up) or
    16 rows (down; 8 at ROWS=8): a 1 KB tile per chunk, 32 B per thread.
    int8: BK = 128 bytes per row, BN = 8 rows, one warp: a 1 KB tile, 32 B per thread.
    KSPLIT (down only): the smallest power of two <= 8 dividing Kd into whole chunks that gives
    cdiv(N, BN) * min(E, S) * KSPLIT >= GEMV_TARGET_PROGRAMS (Mixtral at T=1: 4)."""
    rows = _pow2_at_least(min(T, GEMV_ROWS))
    if bits == 4:
        sub = min(blocksize, 128)  # the kernels' SUB
        nblk = 128 // sub
        while nblk > 1 and Kd % (nblk * sub):
            nblk //= 2
        bk = nblk * sub
        bn = 8 if proj == "gate_up" or rows >= 8 else 16  # down at ROWS=8, BN=16: 168 registers and a spill
        cfg = {"ROWS": rows, "BN": bn, "NBLK": nblk, "num_warps": 1, "num_stages": 1}
    else:
        bk = 128 if Kd % 128 == 0 else (64 if Kd % 64 == 0 else 32)
        bn = 8
        cfg = {"ROWS": rows, "BN": bn, "BK": bk, "num_warps": 1, "num_stages": 1}
    ks = 1
    if proj == "down":
        programs = -(-N // bn) * min(E, S)
        while ks < 8 and programs * ks < GEMV_TARGET_PROGRAMS and Kd % (2 * ks * bk) == 0:
            ks *= 2
    cfg["KSPLIT"] = ks
    return cfg


#: The shape the compile tier builds (Mixtral-8x7B: E, H, I are constexpr, one compile per model shape).
SHAPE = {"E": 8, "H": 4096, "I": 14336}

_W4_ARGS = {
    "q_ptr": "*u8", "absmax_ptr": None, "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
    "code_ptr": "*fp32", "slots_ptr": "*i32", "offsets_ptr": "*i32",
}
_W8_ARGS = {"q_ptr": "*i8", "scale_ptr": "*fp32", "slots_ptr": "*i32", "offsets_ptr": "*i32"}


def _w4_variants(kernel: str) -> list[tuple[str, bool, str]]:
    """(name, nested, lookup) of the 4-bit specs the compile tier builds for kernel "gemv", "tc" or "dot": NF4 and
    nested NF4 with the kernel's default lookup, NF4 with the other one."""
    default = W4_DEFAULT_LOOKUP[kernel]
    other = next(k for k in W4_LOOKUP_IDS if k != default)
    return [("nf4", False, default), ("nf4+nested", True, default), (f"nf4+{other}", False, other)]


def aot_specs() -> list[AotSpec]:
    """Every kernel × activation dtype × weight format × config the launchers pick (ops/quant.py) at SHAPE."""
    H, I = SHAPE["H"], SHAPE["I"]
    specs = []
    for dt in ("bf16", "fp16", "fp32"):
        xp = "*" + dt
        fp32 = dt == "fp32"
        prec = "ieee" if fp32 else "tf32"
        for phase, S in (("decode", 16), ("prefill", 1024)):
            gemm = phase == "prefill"  # BM=16 decode tiles are below wgmma's M=64: mma.sync on sm_90 too
            # 4-bit: NF4 and FP4 share one kernel (the table is an argument); nested absmax is a constexpr;
            # the default lookup, and the other one (H3MOE_W4_LOOKUP) on plain NF4
            for fmt, nested, lookup in _w4_variants("dot"):
                ptrs = {**_W4_ARGS, "absmax_ptr": "*u8" if nested else "*fp32"}
                for proj, fn, Kd, N in (("gate_up", w4_gate_up_kernel, H, I), ("down", w4_down_kernel, I, H)):
                    cfg = pick_config(S, 4, 64, Kd, N, fp32)
                    if proj == "gate_up":
                        sig = {"x_ptr": xp, **ptrs, "out_ptr": xp}
                        extra = {"TOPK": 2, "ACT": 0, "LIMIT": 0.0}
                    else:
                        sig = {"a_ptr": xp, **ptrs, "w_ptr": "*fp32", "out_ptr": "*fp32"}
                        extra = {}
                    sig.update({"NB": "i32", "NB2": "i32"})
                    ce = {**SHAPE, **extra, "BLOCKSIZE": 64, "NESTED": nested, "BM": cfg["BM"], "BN": cfg["BN"],
                          "BK": cfg["BK"], "DOT_PREC": prec, "LOOKUP": W4_LOOKUP_IDS[lookup]}
                    sig.update({k: "constexpr" for k in ce})
                    specs.append(AotSpec(
                        name=f"quant_w4_{proj}[{dt},{fmt},{phase},BM={cfg['BM']},BN={cfg['BN']},BK={cfg['BK']}]",
                        fn=fn, signature=sig, constexprs=ce, num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"], gemm=gemm and not fp32,
                        divisible=tuple(k for k in sig if k.endswith("_ptr"))))
            for proj, fn, Kd, N in (("gate_up", w8_gate_up_kernel, H, I), ("down", w8_down_kernel, I, H)):
                cfg = pick_config(S, 8, 0, Kd, N, fp32)
                if proj == "gate_up":
                    sig = {"x_ptr": xp, **_W8_ARGS, "out_ptr": xp}
                    extra = {"TOPK": 2, "ACT": 0, "LIMIT": 0.0}
                else:
                    sig = {"a_ptr": xp, **_W8_ARGS, "w_ptr": "*fp32", "out_ptr": "*fp32"}
                    extra = {}
                ce = {**SHAPE, **extra, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "DOT_PREC": prec}
                sig.update({k: "constexpr" for k in ce})
                specs.append(AotSpec(
                    name=f"quant_w8_{proj}[{dt},int8,{phase},BM={cfg['BM']},BN={cfg['BN']},BK={cfg['BK']}]",
                    fn=fn, signature=sig, constexprs=ce, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    gemm=gemm and not fp32, divisible=tuple(k for k in sig if k.endswith("_ptr"))))
        specs += _gemv_specs(dt, H, I)
        if not fp32:  # the tensor-core kernels take fp16 / bf16 activations only
            specs += _tc_specs(dt, H, I)
    return specs


#: (T, E) of the calls whose tensor-core configs the compile tier builds at SHAPE's H, I, K=2: T=2 (BM=16,
#: down KSPLIT=8), T=16 (BM=16, KSPLIT=4), T=64 (BM=32) and prefill, T=1024 (BM=64, 8 warps).
TC_AOT_CALLS = ((2, 8), (16, 8), (64, 8), (1024, 8))


def _tc_spec(dt, fmt, T, E, K, nested, lookup, bs, proj, cfg, archs, limit: float = 0.0) -> AotSpec:
    """One tensor-core kernel spec (nested None: int8) with config cfg, for the archs that pick it; limit > 0:
    the gate_up kernel with the clamped SwiGLU (swiglu_limit)."""
    xp = "*" + dt
    if nested is None:
        ptrs, ints, kind = dict(_W8_ARGS), {}, "w8"
        tiles = {"BM": cfg["BM"], "BN": cfg["BN"], "SUB": cfg["SUB"], "DEPTH": cfg["DEPTH"]}
        fn = w8_gate_up_tc_kernel if proj == "gate_up" else w8_down_tc_kernel
    else:
        ptrs = {**_W4_ARGS, "absmax_ptr": "*u8" if nested else "*fp32"}
        ints, kind = {"NB": "i32", "NB2": "i32"}, "w4"
        tiles = {"BLOCKSIZE": bs, "NESTED": nested, "BM": cfg["BM"], "BN": cfg["BN"],
                 "LOOKUP": W4_LOOKUP_IDS[lookup], "DEPTH": cfg["DEPTH"]}
        fn = w4_gate_up_tc_kernel if proj == "gate_up" else w4_down_tc_kernel
    if proj == "gate_up":
        sig = {"x_ptr": xp, **ptrs, "out_ptr": xp, **ints}
        ce = {**SHAPE, "EP": 8, "TOPK": K, "ACT": 0, "LIMIT": limit, **tiles}
        tile = f"BM={cfg['BM']},BN={cfg['BN']},SUB={cfg['SUB']},D={cfg['DEPTH']}"
    else:
        sig = {"a_ptr": xp, **ptrs, "w_ptr": "*fp32", "out_ptr": "*fp32", **ints, "TK": "i32"}
        ce = {**SHAPE, "EP": 8, **tiles, "KSPLIT": cfg["KSPLIT"]}
        tile = f"BM={cfg['BM']},BN={cfg['BN']},SUB={cfg['SUB']},KSPLIT={cfg['KSPLIT']},D={cfg['DEPTH']}"
    sig.update({k: "constexpr" for k in ce})
    only = "" if len(archs) > 1 else f",sm{archs[0]}"
    return AotSpec(
        name=f"quant_{kind}_{proj}_tc[{dt},{fmt},T={T},E={E},{tile},w{cfg['num_warps']}{only}"
             f"{',limit' if limit else ''}]", fn=fn,
        signature=sig, constexprs=ce, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], gemm=True,
        archs=archs, divisible=tuple(k for k in sig if k.endswith("_ptr")))


def _tc_specs(dt: str, H: int, I: int) -> list[AotSpec]:
    """The tensor-core kernels (TC_MIN_T <= T <= TC_MAX_T) for activation dtype dt: NF4 with the
    default lookup and int8 at every TC_AOT_CALLS config; at T=16 also nested NF4, the other lookup and
    blocksize 32 (SUB=32: a 4-word K step). Where sm_80 and sm_90 pick different configs (the words' DEPTH at
    decode tiles), one spec per arch."""
    K = 2
    specs = []
    for T, E in TC_AOT_CALLS:
        variants = [("nf4", False, W4_DEFAULT_LOOKUP["tc"], 64)]
        if T == 16:
            variants += [(f, n, lk, 64) for f, n, lk in _w4_variants("tc")[1:]] + [
                ("nf4+bs32", False, W4_DEFAULT_LOOKUP["tc"], 32)]
        variants += [("int8", None, None, 0)]
        for fmt, nested, lookup, bs in variants:
            for proj in ("gate_up", "down"):
                Kd, N = (H, I) if proj == "gate_up" else (I, H)
                bits = 8 if nested is None else 4
                by_arch = {a: pick_tc_config(T, T * K, E, bits, bs, Kd, N, proj, arch=a) for a in (80, 90)}
                groups = [((80, 90), by_arch[90])] if by_arch[80] == by_arch[90] else [
                    ((a,), by_arch[a]) for a in (80, 90)]
                for archs, cfg in groups:
                    specs.append(_tc_spec(dt, fmt, T, E, K, nested, lookup, bs, proj, cfg, archs))
                    if T == 16 and proj == "gate_up" and fmt in ("nf4", "int8"):  # and its clamped epilogue
                        specs.append(_tc_spec(dt, fmt, T, E, K, nested, lookup, bs, proj, cfg, archs, 7.0))
    return specs


#: Token counts whose GEMV configs the compile tier builds: every ROWS (1, 2, 4, 8) and, at SHAPE, every
#: KSPLIT the down projection picks (T=1: 4, T=2: 2, T>=4: 1); 8 < T <= 16 picks T=8's config.
GEMV_AOT_TOKENS = (1, 2, 4, 8)


def _gemv_specs(dt: str, H: int, I: int) -> list[AotSpec]:
    """The GEMV decode kernels (T <= GEMV_MAX_T) at SHAPE, K=2, for activation dtype dt."""
    E, K = SHAPE["E"], 2
    xp = "*" + dt
    specs = []
    for T in GEMV_AOT_TOKENS:
        S = T * K
        # 4-bit (blocksize 64): the default lookup at every T and nesting; at T=1 also the other lookup
        # (H3MOE_W4_LOOKUP) and blocksize 256 (SUB = 128 < BLOCKSIZE: two absmax lookups per block)
        default = W4_DEFAULT_LOOKUP["gemv"]
        variants = [(f, n, lk, 64) for f, n, lk in _w4_variants("gemv")[:2]] + [("int8", None, None, 0)]
        if T == 1:
            variants += [(f, n, lk, 64) for f, n, lk in _w4_variants("gemv")[2:]] + [("nf4+bs256", False, default, 256)]
        for fmt, nested, lookup, bs in variants:
            for proj in ("gate_up", "down"):
                Kd, N = (H, I) if proj == "gate_up" else (I, H)
                if nested is None:
                    cfg = pick_decode_config(T, S, E, 8, 0, Kd, N, proj)
                    ptrs = dict(_W8_ARGS)
                    tiles = {"ROWS": cfg["ROWS"], "BN": cfg["BN"], "BK": cfg["BK"]}
                    fn = w8_gate_up_gemv_kernel if proj == "gate_up" else w8_down_gemv_kernel
                    ints = {}
                    kind = "w8"
                else:
                    cfg = pick_decode_config(T, S, E, 4, bs, Kd, N, proj)
                    ptrs = {**_W4_ARGS, "absmax_ptr": "*u8" if nested else "*fp32"}
                    tiles = {"BLOCKSIZE": bs, "NESTED": nested, "ROWS": cfg["ROWS"], "BN": cfg["BN"],
                             "NBLK": cfg["NBLK"], "LOOKUP": W4_LOOKUP_IDS[lookup]}
                    fn = w4_gate_up_gemv_kernel if proj == "gate_up" else w4_down_gemv_kernel
                    ints = {"NB": "i32", "NB2": "i32"}
                    kind = "w4"
                if proj == "gate_up":
                    sig = {"x_ptr": xp, **ptrs, "out_ptr": xp, **ints}
                    ce = {**SHAPE, "EP": 8, "TOPK": K, "ACT": 0, "LIMIT": 0.0, **tiles}
                else:
                    sig = {"a_ptr": xp, **ptrs, "w_ptr": "*fp32", "out_ptr": "*fp32", **ints, "TK": "i32"}
                    ce = {**SHAPE, "EP": 8, **tiles, "KSPLIT": cfg["KSPLIT"]}
                sig.update({k: "constexpr" for k in ce})
                tile = ",".join(f"{k}={cfg[k]}" for k in ("ROWS", "BN", "NBLK", "BK", "KSPLIT") if k in cfg
                                and not (k == "KSPLIT" and proj == "gate_up"))
                specs.append(AotSpec(
                    name=f"quant_{kind}_{proj}_gemv[{dt},{fmt},T={T},{tile},w{cfg['num_warps']}]", fn=fn,
                    signature=sig, constexprs=ce, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    divisible=tuple(k for k in sig if k.endswith("_ptr"))))
    return specs
