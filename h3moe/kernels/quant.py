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
               slot order; the caller sums the K slots (deterministic, no atomics).

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
Limits: BLOCKSIZE divides Kd (a block lies inside one row) and BK divides BLOCKSIZE (one absmax per row per
K step); Kd % BK == 0 (no K masks). The even/odd split: a 4-bit K step of BK elements is two dots of BK/2,
one over the high nibbles (even k, activations loaded with stride 2) and one over the low nibbles (odd k),
so no in-register interleave is needed.

Decode (T*K <= 64 rows): BM=16 row tiles, one per active expert, so every weight byte of an active expert is
read once per call (the K weight streams dominate: the kernels are bandwidth-bound there); BN=64 for gate_up
(I/64 programs per expert, each streaming 2*64 rows), BN=32 for down (H/32 per expert).
Bytes moved per token at decode (K active experts per token, each read once when T*K rows hit distinct
experts; shared experts are read once for all their rows):
    4-bit: K * 3*H*I * (1/2 + 4/BLOCKSIZE)       (nested: 1/2 + 1/BLOCKSIZE + 4/(256*BLOCKSIZE))
    8-bit: K * 3*H*I * 1 + K * (2I + H) * 4      (scales)
    plus activations, per token: K*H*2 (x rows gathered, 16-bit) + K*I*2*2 (a written, then read)
    + K*H*4*2 (fp32 o written, then read by the K-sum) + H*2 (y) — under 0.1% of the weights.
e.g. Mixtral-8x7B (H=4096, I=14336, K=2), NF4, BLOCKSIZE=64: 2*3*4096*14336*0.5625 = 198 MB per token per MoE
layer (nested: 182 MB; int8: 352 MB); at ~3 TB/s (H100) that is ~66 µs per layer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .aot import AotSpec

__all__ = ["w4_gate_up_kernel", "w4_down_kernel", "w8_gate_up_kernel", "w8_down_kernel", "pick_config",
           "aot_specs", "ACT_IDS"]

#: activation name -> constexpr id used by the kernels.
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

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
    else:
        return tl.maximum(g, 0.0)


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
def _w4_tile(q_ptr, code_ptr, amax, rows, kh, mask_n, Kd, dtype: tl.constexpr):
    """Dequantize a packed 4-bit tile: rows (BN,) of one expert (q_ptr at its first byte), byte columns kh
    (BK/2,) → (w_even, w_odd) each (BK/2, BN) in dtype (k = 2*kh: high nibble, 2*kh+1: low nibble)."""
    ptrs = q_ptr + rows[None, :].to(tl.int64) * (Kd // 2) + kh[:, None]
    b = tl.load(ptrs, mask=mask_n[None, :], other=0).to(tl.int32)  # (BK/2, BN) packed bytes
    w_hi = (tl.load(code_ptr + (b >> 4)) * amax[None, :]).to(dtype)
    w_lo = (tl.load(code_ptr + (b & 15)) * amax[None, :]).to(dtype)
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
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, end = _find_tile(offsets_ptr, E, pid_m, BM)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)  # (BM,) sorted rows
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)  # (BM,)
    n = pid_n * BN + tl.arange(0, BN)  # (BN,) rows of the gate half
    mask_n = n < I
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
        wg_hi, wg_lo = _w4_tile(q_e, code_ptr, am_g, n, k0 // 2 + kh, mask_n, H, dtype)
        wu_hi, wu_lo = _w4_tile(q_e, code_ptr, am_u, n + I, k0 // 2 + kh, mask_n, H, dtype)
        acc_g = tl.dot(x_even, wg_hi, acc_g, input_precision=DOT_PREC)
        acc_g = tl.dot(x_odd, wg_lo, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(x_even, wu_hi, acc_u, input_precision=DOT_PREC)
        acc_u = tl.dot(x_odd, wu_lo, acc_u, input_precision=DOT_PREC)
    a = _act(acc_g, ACT) * acc_u
    op = out_ptr + rows_m[:, None].to(tl.int64) * I + n[None, :]
    tl.store(op, a.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


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
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, end = _find_tile(offsets_ptr, E, pid_m, BM)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    n = pid_n * BN + tl.arange(0, BN)  # (BN,) output features
    mask_n = n < H
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
        w_hi, w_lo = _w4_tile(q_e, code_ptr, am, n, k0 // 2 + kh, mask_n, I, dtype)
        acc = tl.dot(a_even, w_hi, acc, input_precision=DOT_PREC)
        acc = tl.dot(a_odd, w_lo, acc, input_precision=DOT_PREC)
    slot = tl.load(slots_ptr + rows_m, mask=mask_m, other=0).to(tl.int64)  # (BM,)
    rw = tl.load(w_ptr + slot, mask=mask_m, other=0.0)  # (BM,) fp32
    op = out_ptr + slot[:, None] * H + n[None, :]
    tl.store(op, acc * rw[:, None], mask=mask_m[:, None] & mask_n[None, :])


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
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, end = _find_tile(offsets_ptr, E, pid_m, BM)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    tok = (tl.load(slots_ptr + rows_m, mask=mask_m, other=0) // TOPK).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    mask_n = n < I
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
    a = _act(acc_g, ACT) * acc_u
    op = out_ptr + rows_m[:, None].to(tl.int64) * I + n[None, :]
    tl.store(op, a.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


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
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, end = _find_tile(offsets_ptr, E, pid_m, BM)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    rows_m = start + tl.arange(0, BM)
    mask_m = rows_m < end
    n = pid_n * BN + tl.arange(0, BN)
    mask_n = n < H
    q_e = q_ptr + e64 * H * I
    s = tl.load(scale_ptr + e64 * H + n, mask=mask_n, other=0.0)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        at = tl.load(a_ptr + rows_m[:, None].to(tl.int64) * I + k0 + kk[None, :], mask=mask_m[:, None], other=0.0)
        w = _w8_tile(q_e, s, n, k0 + kk, mask_n, I, dtype)
        acc = tl.dot(at, w, acc, input_precision=DOT_PREC)
    slot = tl.load(slots_ptr + rows_m, mask=mask_m, other=0).to(tl.int64)
    rw = tl.load(w_ptr + slot, mask=mask_m, other=0.0)
    tl.store(out_ptr + slot[:, None] * H + n[None, :], acc * rw[:, None], mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------
# Configurations. No autotuning: a config is picked from S = T*K and the layer shape, so the compile tier
# sees every variant. decode (S <= 64): BM=16 (the smallest tl.dot M), one row tile per active expert, every
# weight byte of an active expert read once, 4 stages of loads in flight; BN=32 when the output width N is
# small (down: N = H) so that a single token still launches >= 2 programs per SM (H=4096, K=2: 256), BN=64
# otherwise (gate_up: N = I, and each program covers BN gate + BN up rows). prefill: BM=64, more reuse per
# weight tile (wgmma on sm_90). 8 warps: with 4, the dequantized tiles spill (cuobjdump STACK > 0 on sm_80 and
# sm_90). BK: 64 elements (32 packed bytes per row = one 32 B sector) for 4-bit, bounded by BLOCKSIZE; int8
# tiles are twice the bytes: BK=128 spills, BK=64 spills at BM=64 on sm_80, so 64 (decode) / 32 (prefill).

DECODE_MAX_ROWS = 64


def pick_config(S: int, bits: int, blocksize: int, Kd: int, N: int) -> dict:
    """Tile sizes for S sorted rows, reduction length Kd (H for gate_up, I for down) and output width N
    (I for gate_up, H for down)."""
    decode = S <= DECODE_MAX_ROWS
    if bits == 4:
        bk = min(64, blocksize)
    else:
        bk = 64 if decode and Kd % 64 == 0 else 32
    if decode:
        bn = 64 if N >= 8192 else 32
        return {"BM": 16, "BN": bn, "BK": bk, "num_warps": 8 if bn == 64 else 4, "num_stages": 4}
    return {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8, "num_stages": 3}


#: The shape the compile tier builds (Mixtral-8x7B: E, H, I are constexpr, one compile per model shape).
SHAPE = {"E": 8, "H": 4096, "I": 14336}

_W4_ARGS = {
    "q_ptr": "*u8", "absmax_ptr": None, "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
    "code_ptr": "*fp32", "slots_ptr": "*i32", "offsets_ptr": "*i32",
}
_W8_ARGS = {"q_ptr": "*i8", "scale_ptr": "*fp32", "slots_ptr": "*i32", "offsets_ptr": "*i32"}


def aot_specs() -> list[AotSpec]:
    """Every kernel × activation dtype × weight format × config the launchers pick (ops/quant.py) at SHAPE."""
    H, I = SHAPE["H"], SHAPE["I"]
    specs = []
    for dt in ("bf16", "fp16"):
        xp = "*" + dt
        for phase, S in (("decode", 16), ("prefill", 1024)):
            gemm = phase == "prefill"  # BM=16 decode tiles are below wgmma's M=64: mma.sync on sm_90 too
            # 4-bit: NF4 and FP4 share one kernel (the table is an argument); nested absmax is a constexpr.
            for fmt, nested in (("nf4", False), ("nf4+nested", True)):
                ptrs = {**_W4_ARGS, "absmax_ptr": "*u8" if nested else "*fp32"}
                for proj, fn, Kd, N in (("gate_up", w4_gate_up_kernel, H, I), ("down", w4_down_kernel, I, H)):
                    cfg = pick_config(S, 4, 64, Kd, N)
                    if proj == "gate_up":
                        sig = {"x_ptr": xp, **ptrs, "out_ptr": xp}
                        extra = {"TOPK": 2, "ACT": 0}
                    else:
                        sig = {"a_ptr": xp, **ptrs, "w_ptr": "*fp32", "out_ptr": "*fp32"}
                        extra = {}
                    sig.update({"NB": "i32", "NB2": "i32"})
                    ce = {**SHAPE, **extra, "BLOCKSIZE": 64, "NESTED": nested, "BM": cfg["BM"], "BN": cfg["BN"],
                          "BK": cfg["BK"], "DOT_PREC": "tf32"}
                    sig.update({k: "constexpr" for k in ce})
                    specs.append(AotSpec(
                        name=f"quant_w4_{proj}[{dt},{fmt},{phase},BM={cfg['BM']},BN={cfg['BN']},BK={cfg['BK']}]",
                        fn=fn, signature=sig, constexprs=ce, num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"], gemm=gemm))
            for proj, fn, Kd, N in (("gate_up", w8_gate_up_kernel, H, I), ("down", w8_down_kernel, I, H)):
                cfg = pick_config(S, 8, 0, Kd, N)
                if proj == "gate_up":
                    sig = {"x_ptr": xp, **_W8_ARGS, "out_ptr": xp}
                    extra = {"TOPK": 2, "ACT": 0}
                else:
                    sig = {"a_ptr": xp, **_W8_ARGS, "w_ptr": "*fp32", "out_ptr": "*fp32"}
                    extra = {}
                ce = {**SHAPE, **extra, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "DOT_PREC": "tf32"}
                sig.update({k: "constexpr" for k in ce})
                specs.append(AotSpec(
                    name=f"quant_w8_{proj}[{dt},int8,{phase},BM={cfg['BM']},BN={cfg['BN']},BK={cfg['BK']}]",
                    fn=fn, signature=sig, constexprs=ce, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    gemm=gemm))
    return specs
