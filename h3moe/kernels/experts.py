"""Triton kernels for the grouped SwiGLU experts (forward and backward) over the fused layout
w_gate_up (E, 2I, H) (gate rows, then up rows) and w_down (E, H, I).

Notation: T tokens, K top-k, S = T*K rows (one per (token, slot)), E experts, H hidden, I intermediate.
Rows are taken in `Routing.sorted_slots` order (S,) int32: row r holds flat slot s = t*K + k, rows of
expert e are [offsets[e], offsets[e+1]). Every kernel reads these two tensors on the device; nothing
here needs a host synchronization, so every launch can be captured in a CUDA graph.

Block schedule (ScatterMoE / vLLM moe_align_block_size, done inside each program instead of a separate
kernel): the grid has M_SLOTS = min(cdiv(S, BM) + E, S) row-tile slots, an upper bound of
sum_e cdiv(count_e, BM). Program `pid_m` loads the (E,) counts from `offsets`, takes a cumsum of
cdiv(count_e, BM) and finds the expert e and row block it covers; programs past the last tile return at
once. So a tile never mixes experts, an expert with no token costs nothing, and the padding per expert is
less than one BM tile; decode configurations use BM=16 (the smallest tl.dot M), not a 64-row tile.
Program ids are swizzled in groups of GROUP_M row tiles (Triton's matmul tutorial) so that consecutive
programs share an expert's weight tiles in L2.

Kernels (all accumulate in fp32; fp32 inputs use tl.dot's "tf32x3", about fp32 accuracy on tensor cores):
  _gate_up_kernel (BWD=False)  forward  A[r] = act(x[t] @ Wg[e]^T) * (x[t] @ Wu[e]^T)        (S, I)
      gather x rows by token, two accumulators (gate, up) share the x tile, the activation is the epilogue.
      SAVE_H (training): also stores the pre-activation h = [gate, up] (S, 2I) in x's dtype for the
      backward, and computes A from those rounded values, so that forward and backward see the same A
      (as eager autograd does; it also keeps the 128x128 tile from spilling).
  _gate_up_kernel (BWD=True)   backward: dA' = dy[t] @ Wd[e] (K-loop over H, dy rows gathered by token).
      Epilogue: a = act(g)*u, per-row partial d(weight) = sum_n dA'*a (one column per N block, summed
      deterministically by the launcher), dA = w*dA', dH = [dA*u*act'(g), dA*act(g)] (S, 2I), and a (S, I)
      for the W_down gradient. Where g, u come from:
        RECOMPUTE=False (default): read from the h the forward saved. One accumulator; its launch role is
          "bwd_act_saved". Costs S*2I saved elements per layer (470 MB in bf16 for Mixtral at T=4096, K=2;
          eager autograd keeps more: h, act(g), u and A).
        RECOMPUTE=True (H3MOE_RECOMPUTE=1, moe(recompute=True)): the gate/up GEMM runs again in the same
          K-loop (sharing the gathered x/dy rows); only the op's inputs are saved. +4*S*H*I FLOPs: the
          backward does 16*S*H*I instead of 12 (role "bwd_act", three accumulators).
  _down_kernel  out[slot] = w[slot] * (A[r] @ Wd[e]^T)   forward down GEMM (TRANS_W=False, SCALE=True)
                dX[slot]  = dH[r] @ Wgu[e]                backward d(x)      (TRANS_W=True, SCALE=False)
      rows are scattered to their slot index: out is an (S, N) buffer in slot order (fp32, or x's dtype with
      H3MOE_COMBINE=lowp) that the combine kernel (kernels/combine.py) sums over K in one pass
      (deterministic), or y itself when K=1, or (ATOMIC=True, opt-in H3MOE_COMBINE=atomic) an fp32 (T, N)
      buffer that every slot adds into with tl.atomic_add: less memory, but the order of the K additions,
      hence the rounding, varies from run to run.
  _wgrad_kernel  dW[e] = sum_{r in e} L[r]^T R[r]: d(w_gate_up) = dH^T xs (E, 2I, H);
                 d(w_down) = dys^T A (E, H, I). The K-loop runs over the expert's rows; an expert with no
                 row gets zeros. Both operands are read in sorted row order: the launcher gathers
                 xs = x[token] and dys = w * dy[token] (S, H) first (two torch passes, S*H*2 bytes each,
                 transient). Gathering inside this loop made every step's tile addresses depend on a load of
                 the same loop (slot -> token), which Triton pipelines one stage late, and the in-register
                 routing-weight scale kept the left tile off cp.async: 1.5-2 stages of shared memory instead
                 of 3 (49-66 KB vs 96 KB at 128x128x64, compile tier).

TMA (constexpr, Config.TMA; Hopper): the dense operands come through tensor descriptors made per program
over its expert only (tl.make_tensor_descriptor: the TMA unit loads the tiles and zero-fills past the
expert's rows and the tensor's edges, so those loads need no mask): the weights in every kernel, the
sorted A / dH rows in _down_kernel (from the tile's first row to its expert's end) and both operands of
_wgrad_kernel (the expert's rows). The gathered x / dy rows stay pointer loads (Hopper's TMA cannot gather
rows). Same values into the same tiles as the pointer loads; fewer instructions per K step.

FLOPs and bytes (bf16, per layer): forward 6*S*H*I FLOPs; bytes ~ E_used*3*H*I*2 (weights) + S*(H+I)*2
+ T*K*H*4 (slot buffer) (+ S*2I*2 for the saved h). Backward: bwd-act 2*S*H*I (6 when recomputing),
d(x) 4*S*H*I, d(W) 6*S*H*I -> 12*S*H*I, twice the forward (16, 2.7x, when recomputing). Decode (S small)
is bandwidth bound: each touched expert's 3*H*I weights are read once per row tile (once, for
S/E_used <= BM).

Limits: offsets inside one expert's weights are int32 (2*I*H < 2**31); expert bases and row offsets are
int64. E <= 4096 (the in-program schedule scans all E counts in one block). ids must lie in [0, E).
Activations: silu (SwiGLU), gelu, gelu_tanh, relu (ACT_IDS), forward and derivative in the epilogues;
HAS_LIMIT adds the clamped SwiGLU of DeepSeek-V4 / GLM-5 / Hunyuan-V4 (swiglu_limit, _glu_fwd/_glu_bwd);
GATED=False takes ungated experts (Nemotron-H: a = act(x @ Wup^T), wgu (E, I, H), h and dh I wide), with
relu2 (squared ReLU) among the activations.
Under TRITON_INTERPRET=1 (INTERP=True): the interpreter gets tl.dot on bf16 wrong (../shared/NOTES.md), so
UPCAST=True casts the dot operands to fp32; and it cannot take a runtime range() bound under numpy >= 2.4,
so the K-loops run as while loops there (on the GPU they stay `for` loops, which Triton pipelines). Each
loop body is one @triton.jit step function shared by both forms.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ACT_IDS",
    "KERNELS",
    "Config",
    "candidate_configs",
    "default_config",
    "aot_specs",
]

#: Activation name -> constexpr id used by the epilogues.
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _act_fwd(g, ACT: tl.constexpr):
    """act(g) in fp32 for the ACT ids of ACT_IDS."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, portable to the interpreter
        return 0.5 * g * (1.0 + th)
    elif ACT == 3:
        return tl.maximum(g, 0.0)
    else:  # relu2 (squared ReLU)
        r = tl.maximum(g, 0.0)
        return r * r


@triton.jit
def _act_bwd(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * d_inner
    elif ACT == 3:
        return tl.maximum(g, 0.0), (g > 0.0).to(tl.float32)
    else:
        r = tl.maximum(g, 0.0)
        return r * r, 2.0 * r


@triton.jit
def _glu_fwd(g, u, ACT: tl.constexpr, LIMIT, HAS_LIMIT: tl.constexpr, GATED: tl.constexpr):
    """act(g) * u in fp32; HAS_LIMIT: the clamped SwiGLU act(min(g, LIMIT)) * clamp(u, -LIMIT, LIMIT)
    (NaN stays NaN, as torch.clamp); not GATED: act(g) (g is then the up projection, u unused)."""
    if not GATED:
        return _act_fwd(g, ACT)
    if HAS_LIMIT:
        g = tl.minimum(g, LIMIT, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                       propagate_nan=tl.PropagateNan.ALL)
    return _act_fwd(g, ACT) * u


@triton.jit
def _glu_bwd(g, u, ACT: tl.constexpr, LIMIT, HAS_LIMIT: tl.constexpr, GATED: tl.constexpr):
    """(a, da/dg, da/du) in fp32 for a = _glu_fwd(g, u); with HAS_LIMIT the derivatives are zero where the
    clamps bind (torch.clamp's gradient: 1 inside the bounds, ends included; 0 for NaN)."""
    if not GATED:
        act, dact = _act_bwd(g, ACT)
        return act, dact, act
    if HAS_LIMIT:
        g_in = g <= LIMIT
        u_in = (u >= -LIMIT) & (u <= LIMIT)
        g = tl.minimum(g, LIMIT, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                       propagate_nan=tl.PropagateNan.ALL)
        act, dact = _act_bwd(g, ACT)
        return act * u, tl.where(g_in, u * dact, 0.0), tl.where(u_in, act, 0.0)
    act, dact = _act_bwd(g, ACT)
    return act * u, u * dact, act


@triton.jit
def _expert_tile(pid_m, offsets_ptr, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """Which expert and row block row-tile slot `pid_m` covers. Returns (e, first row, end row of e);
    e == E when pid_m is past the last tile."""
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < E
    lo = tl.load(offsets_ptr + offs_e, mask=emask, other=0)  # (BLOCK_E,) int32 offsets[e]
    hi = tl.load(offsets_ptr + offs_e + 1, mask=emask, other=0)  # offsets[e+1]
    ntiles = (hi - lo + BM - 1) // BM
    cum = tl.cumsum(ntiles, 0)  # inclusive
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    here = offs_e == e
    first = tl.sum(tl.where(here, cum - ntiles, 0), 0)
    row0 = tl.sum(tl.where(here, lo, 0), 0) + (pid_m - first) * BM
    row_end = tl.sum(tl.where(here, hi, 0), 0)
    return e, row0, row_end


@triton.jit
def _swizzle(pid, M_SLOTS, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(M_SLOTS - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_step(kk, x_ptrs, wg_ptrs, dy_ptrs, wd_ptrs, wgu_desc, wd_desc, n0, acc_g, acc_u, acc_d, H, I, offs_k,
                  nmask, BWD: tl.constexpr, RECOMPUTE: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                  TMA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GATED: tl.constexpr):
    """One BK step of the K-loop over H of _gate_up_kernel. TMA: the weight tiles come through the expert's
    tensor descriptors (wgu_desc (2I, H) blocks (BN, BK); wd_desc (H, I) blocks (BK, BN); zero past the
    edges), the gathered x / dy rows through pointers as always."""
    k0 = kk * BK
    if not EVEN_K:
        kmask = offs_k < H - k0
    if RECOMPUTE or not BWD:  # the gate/up GEMM (forward, or the backward that recomputes it)
        if EVEN_K:
            xa = tl.load(x_ptrs + k0)
        else:
            xa = tl.load(x_ptrs + k0, mask=kmask[None, :], other=0.0)
        # (ungated experts, not GATED: wg is the up projection's tile; acc_u stays unused)
        if TMA:
            wg = tl.trans(wgu_desc.load([n0, k0]))  # (BK, BN)
            if GATED:
                wu = tl.trans(wgu_desc.load([I + n0, k0]))
        elif EVEN_K:
            wg = tl.load(wg_ptrs + k0)
            if GATED:
                wu = tl.load(wg_ptrs + I * H + k0)
        else:
            wg = tl.load(wg_ptrs + k0, mask=kmask[:, None], other=0.0)
            if GATED:
                wu = tl.load(wg_ptrs + I * H + k0, mask=kmask[:, None], other=0.0)
        if UPCAST:
            xa = xa.to(tl.float32)
            wg = wg.to(tl.float32)
            if GATED:
                wu = wu.to(tl.float32)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=PREC)
        if GATED:
            acc_u = tl.dot(xa, wu, acc_u, input_precision=PREC)
    if BWD:
        if EVEN_K:
            dya = tl.load(dy_ptrs + k0)
        else:
            dya = tl.load(dy_ptrs + k0, mask=kmask[None, :], other=0.0)
        if TMA:
            wd = wd_desc.load([k0, n0])  # (BK, BN)
        elif EVEN_K:
            wd = tl.load(wd_ptrs + k0 * I, mask=nmask[None, :], other=0.0)  # n contiguous: masked, not clamped
        else:
            wd = tl.load(wd_ptrs + k0 * I, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            dya = dya.to(tl.float32)
            wd = wd.to(tl.float32)
        acc_d = tl.dot(dya, wd, acc_d, input_precision=PREC)
    return acc_g, acc_u, acc_d


@triton.jit
def _bwd_saved_cols(acc_d, w, rows64, rmask, offs_n, I, h_ptr, a_ptr, dh_ptr, ACT: tl.constexpr, LIMIT,
                    HAS_LIMIT: tl.constexpr, GATED: tl.constexpr):
    """The saved-h backward epilogue over the columns offs_n of I: reads gate/up from h, stores a and dH
    there; returns the rows' partial d(routing weight) over these columns (BM,). Not GATED: h and dH rows
    hold the up projection alone (I wide)."""
    if GATED:
        GI = 2 * I
    else:
        GI = I
    omask = rmask[:, None] & (offs_n < I)[None, :]
    h_ptrs = h_ptr + rows64[:, None] * GI + offs_n[None, :]
    g = tl.load(h_ptrs, mask=omask, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(h_ptrs + I, mask=omask, other=0.0).to(tl.float32)
    else:
        u = g  # (unused)
    a, a_g, a_u = _glu_bwd(g, u, ACT, LIMIT, HAS_LIMIT, GATED)  # masked elements were loaded as 0: a = 0 there
    tl.store(a_ptr + rows64[:, None] * I + offs_n[None, :], a.to(a_ptr.dtype.element_ty), mask=omask)
    part = tl.sum(acc_d * a, 1)
    da = acc_d * w[:, None]
    dh_ptrs = dh_ptr + rows64[:, None] * GI + offs_n[None, :]
    if GATED:
        tl.store(dh_ptrs + I, (da * a_u).to(dh_ptr.dtype.element_ty), mask=omask)  # d up
    tl.store(dh_ptrs, (da * a_g).to(dh_ptr.dtype.element_ty), mask=omask)  # d gate (ungated: d up)
    return part


@triton.jit
def _bwd_saved_halves(acc_d, w, rows64, rmask, n0, I, h_ptr, a_ptr, dh_ptr, ACT: tl.constexpr, LIMIT,
                      HAS_LIMIT: tl.constexpr, GATED: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr):
    """_bwd_saved_cols over the BW columns from n0, in two halves of BW // 2."""
    d_lo, d_hi = tl.split(tl.permute(tl.reshape(acc_d, (BM, 2, BW // 2)), (0, 2, 1)))
    part = _bwd_saved_cols(d_lo, w, rows64, rmask, n0 + tl.arange(0, BW // 2), I, h_ptr, a_ptr, dh_ptr, ACT, LIMIT,
                           HAS_LIMIT, GATED)
    part += _bwd_saved_cols(d_hi, w, rows64, rmask, n0 + BW // 2 + tl.arange(0, BW // 2), I, h_ptr, a_ptr, dh_ptr,
                            ACT, LIMIT, HAS_LIMIT, GATED)
    return part


# Values that change with the batch (T) or the model are not specialized: one compile serves them all.
@triton.jit(do_not_specialize=["E", "M_SLOTS", "K", "LIMIT"])
def _gate_up_kernel(
    x_ptr,  # (T, H) x dtype
    wgu_ptr,  # (E, 2I, H) x dtype
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    a_ptr,  # (S, I) x dtype, out: act(gate)*up per sorted row
    dy_ptr,  # (T, H) x dtype (BWD only)
    wd_ptr,  # (E, H, I) x dtype (BWD only)
    rw_ptr,  # (S,) fp32 routing weights in flat slot order (BWD only)
    dh_ptr,  # (S, 2I) x dtype, out (BWD only): [d gate, d up]
    dw_ptr,  # (S, NB) fp32, out (BWD only): partial d(routing weight), NB = cdiv(I, BN)
    h_ptr,  # (S, 2I) x dtype, [gate, up] pre-activation: out when SAVE_H, in when BWD and not RECOMPUTE
            # (not GATED: wgu (E, I, H) the up projection alone, h and dh (S, I))
    H,
    I,
    E,
    M_SLOTS,  # number of row-tile slots in the grid
    K,  # top-k: token = slot // K (a runtime value: one compile serves every K)
    LIMIT,  # fp32 swiglu_limit (read only when HAS_LIMIT)
    ACT: tl.constexpr,
    HAS_LIMIT: tl.constexpr,  # clamped SwiGLU: act(min(gate, LIMIT)) * clamp(up, -LIMIT, LIMIT)
    GATED: tl.constexpr,  # False: ungated experts (Nemotron-H), a = act(x @ Wup^T)
    BWD: tl.constexpr,
    SAVE_H: tl.constexpr,  # forward: also store the gate/up pre-activation into h (for a backward)
    RECOMPUTE: tl.constexpr,  # backward: recompute gate/up (True) or read them from h (False)
    NEED_W: tl.constexpr,  # backward: store the partial d(routing weight) (False: the weights need no grad)
    BM: tl.constexpr,
    BN: tl.constexpr,  # columns of I per tile (gate and up each)
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    EVEN_K: tl.constexpr,  # H % BK == 0
    TMA: tl.constexpr,  # weight tiles through tensor descriptors (Hopper TMA; the launcher checks alignment)
    PREC: tl.constexpr,  # tl.dot input_precision ("tf32x3" for fp32; ignored for 16-bit)
    UPCAST: tl.constexpr,  # cast dot operands to fp32 (interpreter only)
    INTERP: tl.constexpr,  # running under TRITON_INTERPRET=1
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(I, BN)
    pid_m, pid_n = _swizzle(pid, M_SLOTS, num_pid_n, GROUP_M)
    e, row0, row_end = _expert_tile(pid_m, offsets_ptr, E, BM, BLOCK_E)
    if e < E:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        slot = tl.load(slots_ptr + rows, mask=rmask, other=0)
        tok = (slot // K).to(tl.int64)  # masked rows read token 0: no mask on the x loads
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < I
        offs_nc = tl.where(nmask, offs_n, 0)  # clamped: no mask on the weight loads
        offs_k = tl.arange(0, BK)
        e64 = e.to(tl.int64)
        x_ptrs = x_ptr + tok[:, None] * H + offs_k[None, :]  # (BM, BK)
        if GATED:  # one expert's wgu rows: [gate; up] (2I) or, ungated, up (I)
            w_base = wgu_ptr + e64 * 2 * I * H
        else:
            w_base = wgu_ptr + e64 * I * H
        wg_ptrs = w_base + offs_nc[None, :].to(tl.int64) * H + offs_k[:, None]  # (BK, BN)
        dy_ptrs = dy_ptr + tok[:, None] * H + offs_k[None, :]  # (BM, BK), BWD only
        wd_ptrs = wd_ptr + e64 * H * I + offs_k[:, None].to(tl.int64) * I + offs_n[None, :]  # (BK, BN), BWD
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        acc_d = tl.zeros((BM, BN), dtype=tl.float32)  # dy @ Wd (BWD only; dead code otherwise)
        n0 = pid_n * BN
        wgu_desc = wg_ptrs  # placeholders where a descriptor is not used
        wd_desc = wd_ptrs
        if TMA:  # one descriptor per weight this program reads, over its expert only
            if RECOMPUTE or not BWD:
                wgu_desc = tl.make_tensor_descriptor(w_base, shape=[2 * I if GATED else I, H], strides=[H, 1],
                                                     block_shape=[BN, BK])
            if BWD:
                wd_desc = tl.make_tensor_descriptor(wd_ptr + e64 * H * I, shape=[H, I], strides=[I, 1],
                                                    block_shape=[BK, BN])
        nk = tl.cdiv(H, BK)
        if INTERP:  # the interpreter cannot take a runtime range bound (numpy >= 2.4): a while loop there
            kk = 0
            while kk < nk:
                acc_g, acc_u, acc_d = _gate_up_step(kk, x_ptrs, wg_ptrs, dy_ptrs, wd_ptrs, wgu_desc, wd_desc, n0,
                                                    acc_g, acc_u, acc_d, H, I, offs_k, nmask, BWD, RECOMPUTE, BK,
                                                    EVEN_K, TMA, PREC, UPCAST, GATED)
                kk += 1
        else:
            for kk in range(0, nk):
                acc_g, acc_u, acc_d = _gate_up_step(kk, x_ptrs, wg_ptrs, dy_ptrs, wd_ptrs, wgu_desc, wd_desc, n0,
                                                    acc_g, acc_u, acc_d, H, I, offs_k, nmask, BWD, RECOMPUTE, BK,
                                                    EVEN_K, TMA, PREC, UPCAST, GATED)
        rows64 = rows.to(tl.int64)
        omask = rmask[:, None] & nmask[None, :]
        if GATED:
            GI = 2 * I  # the row length of h and dh
        else:
            GI = I
        h_ptrs = h_ptr + rows64[:, None] * GI + offs_n[None, :]  # (BM, BN) gate; + I: up
        a_ptrs = a_ptr + rows64[:, None] * I + offs_n[None, :]
        if BWD and not RECOMPUTE and BN >= 128:
            # the saved form's epilogue in two column halves: each loads its half of h, so only half of
            # the loaded gate/up chain is live at a time (one 128x128 pass spills hundreds of bytes)
            w = tl.load(rw_ptr + slot, mask=rmask, other=0.0)  # (BM,) fp32
            d_lo, d_hi = tl.split(tl.permute(tl.reshape(acc_d, (BM, 2, BN // 2)), (0, 2, 1)))
            if HAS_LIMIT:  # the clamps' masks: in column quarters (halves spilled 112 B at 128x128)
                part = _bwd_saved_halves(d_lo, w, rows64, rmask, pid_n * BN, I, h_ptr, a_ptr, dh_ptr, ACT, LIMIT,
                                         HAS_LIMIT, GATED, BM, BN // 2)
                part += _bwd_saved_halves(d_hi, w, rows64, rmask, pid_n * BN + BN // 2, I, h_ptr, a_ptr, dh_ptr,
                                          ACT, LIMIT, HAS_LIMIT, GATED, BM, BN // 2)
            else:
                part = _bwd_saved_cols(d_lo, w, rows64, rmask, pid_n * BN + tl.arange(0, BN // 2),
                                       I, h_ptr, a_ptr, dh_ptr, ACT, LIMIT, HAS_LIMIT, GATED)
                part += _bwd_saved_cols(d_hi, w, rows64, rmask, pid_n * BN + BN // 2 + tl.arange(0, BN // 2),
                                        I, h_ptr, a_ptr, dh_ptr, ACT, LIMIT, HAS_LIMIT, GATED)
            if NEED_W:
                tl.store(dw_ptr + rows64 * num_pid_n + pid_n, part, mask=rmask)
        elif BWD:
            if RECOMPUTE:
                a, a_g, a_u = _glu_bwd(acc_g, acc_u, ACT, LIMIT, HAS_LIMIT, GATED)  # (BM, BN) fp32
            else:  # saved by the forward (rounded to x's dtype, as eager autograd saves it)
                g = tl.load(h_ptrs, mask=omask, other=0.0).to(tl.float32)
                if GATED:
                    u = tl.load(h_ptrs + I, mask=omask, other=0.0).to(tl.float32)
                else:
                    u = g  # (unused)
                a, a_g, a_u = _glu_bwd(g, u, ACT, LIMIT, HAS_LIMIT, GATED)
            tl.store(a_ptrs, a.to(a_ptr.dtype.element_ty), mask=omask)
            if RECOMPUTE:  # masked columns of the recomputed gate/up hold clamped-column values
                part = tl.sum(tl.where(omask, acc_d * a, 0.0), 1)  # (BM,) partial d(routing weight)
            else:  # masked elements were loaded as 0: a = act(0) * 0 = 0 there
                part = tl.sum(acc_d * a, 1)
            if NEED_W:
                tl.store(dw_ptr + rows64 * num_pid_n + pid_n, part, mask=rmask)
            w = tl.load(rw_ptr + slot, mask=rmask, other=0.0)  # (BM,) fp32
            da = acc_d * w[:, None]
            dh_ptrs = dh_ptr + rows64[:, None] * GI + offs_n[None, :]
            if GATED:
                tl.store(dh_ptrs + I, (da * a_u).to(dh_ptr.dtype.element_ty), mask=omask)  # d up
            tl.store(dh_ptrs, (da * a_g).to(dh_ptr.dtype.element_ty), mask=omask)  # d gate (ungated: d up)
        else:
            if SAVE_H:
                # the backward will read these rounded values: compute a from them too, as eager does
                g16 = acc_g.to(h_ptr.dtype.element_ty)
                u16 = acc_u.to(h_ptr.dtype.element_ty)
                tl.store(h_ptrs, g16, mask=omask)
                if GATED:
                    tl.store(h_ptrs + I, u16, mask=omask)
                a = _glu_fwd(g16.to(tl.float32), u16.to(tl.float32), ACT, LIMIT, HAS_LIMIT, GATED)
            else:
                a = _glu_fwd(acc_g, acc_u, ACT, LIMIT, HAS_LIMIT, GATED)
            tl.store(a_ptrs, a.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _down_step(kk, a_ptrs, w_ptrs, w_step, a_desc, w_desc, n0, acc, KD, offs_k, nmask, TRANS_W: tl.constexpr,
               BK: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One BK step of the K-loop of _down_kernel; w_step: weight elements per unit of k; TRANS_W: the weight
    is n-contiguous (masked in n: a clamp would hide the contiguity). TMA: both tiles
    through tensor descriptors (a_desc: the tile's rows to its expert's end, blocks (BM, BK); w_desc: the
    expert's weight, blocks (BK, BN) if TRANS_W else (BN, BK); zero past the edges: no masks)."""
    k0 = kk * BK
    if TMA:
        aa = a_desc.load([0, k0])
        if TRANS_W:
            ww = w_desc.load([k0, n0])
        else:
            ww = tl.trans(w_desc.load([n0, k0]))
    elif EVEN_K:
        aa = tl.load(a_ptrs + k0)
        if TRANS_W:
            ww = tl.load(w_ptrs + k0 * w_step, mask=nmask[None, :], other=0.0)
        else:
            ww = tl.load(w_ptrs + k0 * w_step)
    else:
        kmask = offs_k < KD - k0
        aa = tl.load(a_ptrs + k0, mask=kmask[None, :], other=0.0)
        if TRANS_W:
            ww = tl.load(w_ptrs + k0 * w_step, mask=kmask[:, None] & nmask[None, :], other=0.0)
        else:
            ww = tl.load(w_ptrs + k0 * w_step, mask=kmask[:, None], other=0.0)
    if UPCAST:
        aa = aa.to(tl.float32)
        ww = ww.to(tl.float32)
    return tl.dot(aa, ww, acc, input_precision=PREC)


# Values that change with the batch (T) or the model are not specialized: one compile serves them all.
@triton.jit(do_not_specialize=["E", "M_SLOTS", "K"])
def _down_kernel(
    a_ptr,  # (S, KD) x dtype, rows in sorted order: A (forward) or dH (backward d(x))
    w_ptr,  # forward: w_down (E, N=H, KD=I); backward d(x): w_gate_up (E, KD=2I, N=H); x dtype
    slots_ptr,  # (S,) int32 sorted_slots
    offsets_ptr,  # (E+1,) int32
    rw_ptr,  # (S,) fp32 routing weights in flat slot order (SCALE only)
    out_ptr,  # (S, N) slot-ordered buffer (fp32, or y itself when K=1); ATOMIC: (T, N) fp32
    N,
    KD,
    E,
    M_SLOTS,
    K,  # top-k
    TRANS_W: tl.constexpr,  # False: w[e, n, k] (k contiguous); True: w[e, k, n] (n contiguous)
    SCALE: tl.constexpr,  # multiply each row by its routing weight
    ATOMIC: tl.constexpr,  # tl.atomic_add into out[token] instead of a store to out[slot]
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    EVEN_K: tl.constexpr,  # KD % BK == 0
    TMA: tl.constexpr,  # A and weight tiles through tensor descriptors (Hopper TMA; the launcher checks alignment)
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _swizzle(pid, M_SLOTS, num_pid_n, GROUP_M)
    e, row0, row_end = _expert_tile(pid_m, offsets_ptr, E, BM, BLOCK_E)
    if e < E:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows_c = tl.where(rmask, rows, row0).to(tl.int64)  # clamped: no row mask on the A loads
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        offs_nc = tl.where(nmask, offs_n, 0).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rows_c[:, None] * KD + offs_k[None, :]  # (BM, BK)
        w_base = w_ptr + e.to(tl.int64) * N * KD
        if TRANS_W:  # n contiguous: mask n (a clamp by tl.where would hide the contiguity)
            w_ptrs = w_base + offs_k[:, None].to(tl.int64) * N + offs_n[None, :]  # (BK, BN)
            w_step = N
        else:
            w_ptrs = w_base + offs_nc[None, :] * KD + offs_k[:, None]  # (BK, BN)
            w_step = 1
        a_desc = a_ptrs  # placeholders where a descriptor is not used
        w_desc = w_ptrs
        if TMA:
            # the A rows from this tile's first to its expert's last: the rows past BM are never loaded
            a_desc = tl.make_tensor_descriptor(a_ptr + row0.to(tl.int64) * KD, shape=[row_end - row0, KD],
                                               strides=[KD, 1], block_shape=[BM, BK])
            if TRANS_W:
                w_desc = tl.make_tensor_descriptor(w_base, shape=[KD, N], strides=[N, 1], block_shape=[BK, BN])
            else:
                w_desc = tl.make_tensor_descriptor(w_base, shape=[N, KD], strides=[KD, 1], block_shape=[BN, BK])
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        nk = tl.cdiv(KD, BK)
        if INTERP:
            kk = 0
            while kk < nk:
                acc = _down_step(kk, a_ptrs, w_ptrs, w_step, a_desc, w_desc, n0, acc, KD, offs_k, nmask, TRANS_W,
                                 BK, EVEN_K, TMA, PREC, UPCAST)
                kk += 1
        else:
            for kk in range(0, nk):
                acc = _down_step(kk, a_ptrs, w_ptrs, w_step, a_desc, w_desc, n0, acc, KD, offs_k, nmask, TRANS_W,
                                 BK, EVEN_K, TMA, PREC, UPCAST)
        slot = tl.load(slots_ptr + rows, mask=rmask, other=0)
        if SCALE:
            w = tl.load(rw_ptr + slot, mask=rmask, other=0.0)  # (BM,) fp32
            acc = acc * w[:, None]
        omask = rmask[:, None] & nmask[None, :]
        if ATOMIC:
            tok = (slot // K).to(tl.int64)
            tl.atomic_add(out_ptr + tok[:, None] * N + offs_n[None, :], acc, mask=omask, sem="relaxed")
        else:
            out_ptrs = out_ptr + slot.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _wgrad_step(r0, hi, l_ptr, r_ptr, acc, M, N, offs_m, offs_n, mmask, nmask, offs_r, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    """One step of BK rows of _wgrad_kernel's loop over an expert's rows."""
    rows = r0 + offs_r
    rmask = rows < hi
    rows64 = rows.to(tl.int64)
    # masks, not clamped indices, on the contiguous dims: tl.where would hide their contiguity and turn the
    # tile loads into scalar loads that the pipeliner cannot make asynchronous
    lt = tl.load(l_ptr + rows64[None, :] * M + offs_m[:, None], mask=rmask[None, :] & mmask[:, None],
                 other=0.0)  # (BM, BK)
    rt = tl.load(r_ptr + rows64[:, None] * N + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                 other=0.0)  # (BK, BN)
    if UPCAST:
        lt = lt.to(tl.float32)
        rt = rt.to(tl.float32)
    return tl.dot(lt, rt, acc, input_precision=PREC)


@triton.jit
def _wgrad_step_tma(r, l_desc, r_desc, acc, m0, n0, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One step of _wgrad_kernel's loop through the expert's tensor descriptors (rows past its last are
    zeros: no mask). r: the step's first row, counted from the expert's first."""
    lt = tl.trans(l_desc.load([r, m0]))  # (BM, BK)
    rt = r_desc.load([r, n0])  # (BK, BN)
    if UPCAST:
        lt = lt.to(tl.float32)
        rt = rt.to(tl.float32)
    return tl.dot(lt, rt, acc, input_precision=PREC)


@triton.jit
def _wgrad_kernel(
    l_ptr,  # (S, M) x dtype, sorted rows of the left operand: dH (S, 2I) | w * dy[token] (S, H)
    r_ptr,  # (S, N) x dtype, sorted rows of the right operand: x[token] (S, H) | A (S, I)
    offsets_ptr,  # (E+1,) int32
    out_ptr,  # (E, M, N) weight dtype: d(w_gate_up) (E, 2I, H) | d(w_down) (E, H, I)
    M,
    N,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,  # rows per step
    GROUP_M: tl.constexpr,
    TMA: tl.constexpr,  # both operands through tensor descriptors over the expert's rows (Hopper TMA)
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    tiles = num_pid_m * num_pid_n
    e = pid // tiles
    pid_m, pid_n = _swizzle(pid % tiles, num_pid_m, num_pid_n, GROUP_M)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    offs_r = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TMA:
        # descriptors over this expert's rows only (at least one row: an empty expert loads nothing)
        n_e = tl.maximum(hi - lo, 1)
        l_desc = tl.make_tensor_descriptor(l_ptr + lo.to(tl.int64) * M, shape=[n_e, M], strides=[M, 1],
                                           block_shape=[BK, BM])
        r_desc = tl.make_tensor_descriptor(r_ptr + lo.to(tl.int64) * N, shape=[n_e, N], strides=[N, 1],
                                           block_shape=[BK, BN])
        if INTERP:
            r = 0
            while r < hi - lo:
                acc = _wgrad_step_tma(r, l_desc, r_desc, acc, pid_m * BM, pid_n * BN, PREC, UPCAST)
                r += BK
        else:
            for r in range(0, hi - lo, BK):
                acc = _wgrad_step_tma(r, l_desc, r_desc, acc, pid_m * BM, pid_n * BN, PREC, UPCAST)
    elif INTERP:
        r0 = lo
        while r0 < hi:
            acc = _wgrad_step(r0, hi, l_ptr, r_ptr, acc, M, N, offs_m, offs_n, mmask, nmask, offs_r, PREC, UPCAST)
            r0 += BK
    else:
        for r0 in range(lo, hi, BK):
            acc = _wgrad_step(r0, hi, l_ptr, r_ptr, acc, M, N, offs_m, offs_n, mmask, nmask, offs_r, PREC, UPCAST)
    out_ptrs = out_ptr + e.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------------------------------------------
# Configurations: (BM, BN, BK, GROUP_M, num_warps, num_stages). Every candidate below compiles for its
# architectures without a register spill and within their shared memory (A100 164 KB, H100 228 KB),
# checked with the cuobjdump of the Triton wheel (aot_specs, tests/test_compile_tier.py). Candidates marked
# Hopper-only spill or overflow on sm_80 (its mma.sync keeps more in registers than wgmma does).
# ---------------------------------------------------------------------------------------------------

#: Kernel roles: the launcher's name for each use of a kernel.
KERNELS = ("gate_up", "down", "bwd_act", "bwd_act_saved", "dx", "wgrad_gu", "wgrad_down")


class Config(tuple):
    """(BM, BN, BK, GROUP_M, num_warps, num_stages, TMA). TMA: the dense operands (the weights; the down and
    wgrad kernels' sorted rows too) go through tensor descriptors, loaded by Hopper's TMA unit instead of
    per-thread cp.async: fewer instructions per K step (wgrad 128x128x64: 69 in the main loop against 149,
    compile tier). Hopper and later only; a launch whose strides or pointers are not 16-byte aligned runs
    the same tiles without it."""

    __slots__ = ()
    hopper_only = False

    def __new__(cls, BM, BN, BK, GROUP_M=8, num_warps=4, num_stages=3, TMA=False):
        return super().__new__(cls, (BM, BN, BK, GROUP_M, num_warps, num_stages, bool(TMA)))

    BM = property(lambda s: s[0])
    BN = property(lambda s: s[1])
    BK = property(lambda s: s[2])
    GROUP_M = property(lambda s: s[3])
    num_warps = property(lambda s: s[4])
    num_stages = property(lambda s: s[5])
    TMA = property(lambda s: s[6])

    def as_dict(self) -> dict:
        d = dict(zip(("BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"), self))
        if self.TMA:  # absent from the files of configs without it
            d["TMA"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cls = _HopperConfig if d.get("TMA") else cls
        return cls(int(d["BM"]), int(d["BN"]), int(d["BK"]), int(d.get("GROUP_M", 8)), int(d["num_warps"]),
                   int(d["num_stages"]), bool(d.get("TMA", False)))

    def with_tma(self, on: bool) -> "Config":
        """The same tiles with or without tensor descriptors."""
        return (_HopperConfig if on or self.hopper_only else Config)(*self[:6], TMA=on)

    def __repr__(self) -> str:
        return "BM={},BN={},BK={},G={},w{},s{}".format(*self) + (",tma" if self.TMA else "")


class _HopperConfig(Config):
    __slots__ = ()
    hopper_only = True


C = Config
Hp = _HopperConfig


def Tma(*tile) -> Config:
    """A Hopper candidate whose dense operands go through tensor descriptors (Config.TMA)."""
    return _HopperConfig(*tile, TMA=True)


# 16-bit dtypes. Row tiles by regime: "decode" (<= 16 rows per used expert), "small" (<= 64), "large".
# Every Tma(...) candidate has its pointer-load twin in the same list (what it runs as where descriptors
# cannot run, so the compile tier covers that too). Tma(...) candidates come last: not a default until a GPU run has timed them; the launcher leaves them out
# unless H3MOE_TMA=auto or 1 (ops/triton_experts.py; scripts/gpu_followup.sh tunes and profiles with auto).
# 16 is tl.dot's smallest M; decode is bandwidth bound, so its tiles are narrow in N (many programs stream
# the weights) and deep in K (many bytes in flight per program). The first candidate that runs on the
# device's architecture is the pinned default.
_CANDIDATES = {
    "gate_up": {  # BN counts gate columns (the tile computes BN gate + BN up columns)
        "decode": [C(16, 64, 128, 1, 4, 4), C(16, 32, 128, 1, 4, 4), C(16, 64, 64, 1, 4, 5)],
        "small": [C(64, 64, 64, 8, 4, 4), C(32, 64, 128, 8, 4, 3), C(64, 128, 64, 8, 8, 3)],
        "large": [Hp(128, 128, 64, 8, 8, 3), C(128, 64, 64, 8, 8, 4), C(64, 128, 64, 8, 8, 3),
                  Tma(128, 128, 64, 8, 8, 3)],
    },
    "down": {
        "decode": [C(16, 64, 128, 1, 4, 4), C(16, 32, 128, 1, 4, 4), C(16, 64, 64, 1, 4, 5)],
        "small": [C(64, 64, 64, 8, 4, 4), C(32, 64, 128, 8, 4, 3), C(64, 128, 64, 8, 4, 3)],
        # 64-row tiles for many-expert prefill (Qwen3-30B-A3B at 4096 tokens: ~256 rows per expert, about
        # half of the experts end in a 128-row tile holding 1-16 rows; gate_up's list has its 64-row tile)
        "large": [Hp(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 4), Hp(128, 128, 64, 8, 4, 3),
                  C(64, 128, 64, 8, 4, 4), Tma(128, 256, 64, 8, 8, 3), Tma(128, 128, 64, 8, 8, 4)],
    },
    "bwd_act": {  # three accumulators (gate, up, dy @ Wd)
        "decode": [C(16, 64, 64, 1, 4, 3), C(16, 32, 128, 1, 4, 3)],
        "small": [C(32, 64, 64, 8, 4, 3), Hp(64, 64, 64, 8, 4, 3)],
        # 128x64x64 s3 needs 172 KB of shared memory: H100 only
        "large": [C(128, 64, 32, 8, 8, 4), Hp(128, 64, 64, 8, 8, 3), C(64, 64, 32, 8, 4, 4)],
    },
    "bwd_act_saved": {  # one accumulator (dy @ Wd); gate/up read from the saved pre-activation
        "decode": [C(16, 64, 128, 1, 4, 4), C(16, 32, 128, 1, 4, 4)],
        "small": [C(64, 64, 64, 8, 4, 4), C(32, 64, 128, 8, 4, 3)],
        # 8 warps: 64 fp32 accumulators per thread at most. From BN=128 the epilogue runs in two column
        # halves (one pass spilled 408 B at 128x128 on sm_90; the halves spill nothing there, 191
        # registers, and 64 FLOP per byte of tile loads against 43 at 128x64); sm_80's mma.sync still
        # spills 144 B at 128x128, so Ampere keeps 128x64.
        "large": [Hp(128, 128, 64, 8, 8, 4), C(128, 64, 64, 8, 8, 4), Hp(128, 128, 64, 8, 8, 3),
                  C(64, 128, 64, 8, 8, 3), C(128, 64, 32, 8, 8, 4), Tma(128, 128, 64, 8, 8, 4)],
    },
    "dx": {
        "decode": [C(16, 64, 128, 1, 4, 4), C(16, 32, 128, 1, 4, 4)],
        "small": [C(64, 64, 64, 8, 4, 4), C(64, 128, 64, 8, 4, 3)],
        "large": [C(128, 128, 64, 8, 8, 4), C(128, 256, 64, 8, 8, 3), Hp(128, 128, 64, 8, 4, 3),
                  Tma(128, 128, 64, 8, 8, 4), Tma(128, 256, 64, 8, 8, 3)],
    },
    # weight gradients: a BM x BN tile of dW[e], BK of the expert's rows per step; both roles run the same
    # kernel on sorted operands, so they share one list (tuned separately: their shapes differ)
    "wgrad_gu": {
        "decode": [C(64, 64, 16, 8, 4, 3), C(32, 64, 32, 8, 4, 3)],
        "small": [C(64, 64, 32, 8, 4, 3), C(64, 128, 32, 8, 4, 3)],
        "large": [C(128, 128, 64, 8, 8, 3), C(128, 128, 32, 8, 4, 4), Hp(128, 256, 64, 8, 8, 3),
                  Hp(128, 128, 64, 8, 8, 4), Tma(128, 128, 64, 8, 8, 3), Tma(128, 256, 64, 8, 8, 3),
                  Tma(128, 128, 64, 8, 8, 4)],
    },
}
_CANDIDATES["wgrad_down"] = _CANDIDATES["wgrad_gu"]

# fp32 (tf32x3: three tensor-core products per dot, about fp32 accuracy) needs about twice the registers
# and shared memory of 16-bit: smaller tiles, the same for every regime but decode. Not a speed target.
_CANDIDATES_FP32 = {
    "gate_up": {"decode": [C(16, 32, 32, 1, 4, 3)], "rest": [C(64, 32, 32, 8, 4, 3)]},
    "down": {"decode": [C(16, 64, 32, 1, 4, 3)], "rest": [C(64, 64, 32, 8, 4, 3)]},
    "bwd_act": {"decode": [C(16, 32, 32, 1, 4, 3)], "rest": [C(64, 32, 16, 8, 4, 3)]},
    "bwd_act_saved": {"decode": [C(16, 64, 32, 1, 4, 3)], "rest": [C(64, 64, 32, 8, 4, 3)]},
    "dx": {"decode": [C(16, 64, 32, 1, 4, 3)], "rest": [C(64, 64, 32, 8, 4, 3)]},
    "wgrad_gu": {"decode": [C(64, 64, 16, 8, 4, 3)], "rest": [C(64, 64, 32, 8, 4, 3)]},
}
_CANDIDATES_FP32["wgrad_down"] = _CANDIDATES_FP32["wgrad_gu"]


def regime(S: int, E: int, K: int) -> str:
    """Rows per used expert decide the tile height. At most min(E, S) experts are used."""
    used = max(1, min(E, S))
    per = S / used
    if per <= 16:
        return "decode"
    if per <= 64:
        return "small"
    return "large"


def candidate_configs(kernel: str, S: int, E: int, K: int, fp32: bool = False, arch: int = 90) -> list[Config]:
    """Candidates for one launch; `arch` is the compute capability major*10 (80: Ampere, 90: Hopper)."""
    reg = regime(S, E, K)
    if fp32:
        table = _CANDIDATES_FP32[kernel]
        return list(table["decode" if reg == "decode" else "rest"])
    return [c for c in _CANDIDATES[kernel][reg] if arch >= 90 or not c.hopper_only]


def default_config(kernel: str, S: int, E: int, K: int, fp32: bool = False, arch: int = 90) -> Config:
    """The pinned config (H3MOE_AUTOTUNE=0, and any shape with no tuned entry under CUDA graph capture)."""
    return candidate_configs(kernel, S, E, K, fp32, arch)[0]


def all_configs(kernel: str, fp32: bool = False) -> list[Config]:
    table = _CANDIDATES_FP32[kernel] if fp32 else _CANDIDATES[kernel]
    seen: list[Config] = []
    for cands in table.values():
        for c in cands:
            if c not in seen:
                seen.append(c)
    return seen


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (h3moe/kernels/aot.py)
# ---------------------------------------------------------------------------------------------------

_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _prec(dt: str) -> str:
    return "tf32x3" if dt == "fp32" else "tf32"


#: Integer arguments that are multiples of 16 at every realistic shape (H, I and their multiples). Triton's
#: JIT specializes such values (and 16-byte aligned pointers) as divisible by 16, which is what lets it
#: vectorize the tile loads and pipeline them with cp.async; an ahead-of-time compile without these hints
#: shows scalar loads, no pipelining and register spills that never happen at run time.
AOT_DIVISIBLE = {"_gate_up_kernel": ("H", "I"), "_down_kernel": ("N", "KD"), "_wgrad_kernel": ("M", "N")}


def _divisible(fn) -> dict:
    """Keyword for AotSpec when it has a `divisible` field (argument names to compile as multiples of 16,
    pointers included): compile_spec turns it into ASTSource attrs {(index,): [["tt.divisibility", 16]]}."""
    from .aot import AotSpec

    if "divisible" not in getattr(AotSpec, "__dataclass_fields__", {}):
        return {}
    ptrs = tuple(n for n in fn.arg_names if n.endswith("_ptr"))
    return {"divisible": ptrs + AOT_DIVISIBLE[fn.__name__]}


def _spec(name: str, fn, sig: dict, const: dict, cfg: Config, max_local_bytes: int = 0):
    from .aot import AotSpec

    sig = {**sig, **{k: "constexpr" for k in const}}
    assert set(sig) == set(fn.arg_names), (name, set(sig) ^ set(fn.arg_names))
    # BM < 64 (decode tiles) is below wgmma's M: those use mma.sync on sm_90 too, by design.
    return AotSpec(name=name, fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=const,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, gemm=cfg.BM >= 64,
                   archs=(90,) if cfg.hopper_only else (80, 90), tma=cfg.TMA, max_local_bytes=max_local_bytes,
                   **_divisible(fn))


def aot_specs() -> list:
    specs = []
    for dt, p in _DT.items():
        fp32 = dt == "fp32"
        prec = _prec(dt)
        for role in KERNELS:
            for cfg in all_configs(role, fp32):
                tile = dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M)
                name = f"experts_{role}[{dt},{cfg!r}]"
                if role in ("gate_up", "bwd_act", "bwd_act_saved"):
                    # the forward is compiled as training runs it (SAVE_H: two more tile stores than
                    # inference); the backward in both of its forms (recompute, saved pre-activation)
                    bwd = role != "gate_up"
                    sig = {"x_ptr": p, "wgu_ptr": p, "slots_ptr": "*i32", "offsets_ptr": "*i32", "a_ptr": p,
                           "dy_ptr": p, "wd_ptr": p, "rw_ptr": "*fp32", "dh_ptr": p, "dw_ptr": "*fp32",
                           "h_ptr": p, "H": "i32", "I": "i32", "E": "i32", "M_SLOTS": "i32", "K": "i32",
                           "LIMIT": "fp32"}
                    const = dict(ACT=0, HAS_LIMIT=False, GATED=True, BWD=bwd, SAVE_H=not bwd,
                                 RECOMPUTE=role == "bwd_act", NEED_W=bwd, **tile,
                                 BLOCK_E=8,
                                 EVEN_K=True, TMA=cfg.TMA, PREC=prec, UPCAST=False, INTERP=False)
                    specs.append(_spec(name, _gate_up_kernel, sig, const, cfg))
                    if dt == "bf16":  # the clamped SwiGLU (swiglu_limit): its epilogue adds the clamps and masks
                        # (the recompute form, H3MOE_RECOMPUTE=1, keeps its one-pass epilogue: up to 40 B of
                        # spills at its larger tiles, bounded here; the saved form runs it in column quarters)
                        specs.append(_spec(f"experts_{role}_limit[{dt},{cfg!r}]", _gate_up_kernel, sig,
                                           {**const, "HAS_LIMIT": True}, cfg, 48 if role == "bwd_act" else 0))
                        # ungated experts (Nemotron-H: relu2 of the up projection)
                        specs.append(_spec(f"experts_{role}_ungated[{dt},{cfg!r}]", _gate_up_kernel, sig,
                                           {**const, "GATED": False, "ACT": 4}, cfg))
                    if not bwd:  # and as inference runs it (no h stored), with a many-expert schedule (E=128)
                        specs.append(_spec(f"experts_{role}_infer[{dt},{cfg!r}]", _gate_up_kernel, sig,
                                           {**const, "SAVE_H": False, "BLOCK_E": 128}, cfg))
                elif role in ("down", "dx"):
                    dx = role == "dx"
                    sig = {"a_ptr": p, "w_ptr": p, "slots_ptr": "*i32", "offsets_ptr": "*i32", "rw_ptr": "*fp32",
                           "out_ptr": "*fp32", "N": "i32", "KD": "i32", "E": "i32", "M_SLOTS": "i32", "K": "i32"}
                    const = dict(TRANS_W=dx, SCALE=not dx, ATOMIC=False, **tile, BLOCK_E=8, EVEN_K=True,
                                 TMA=cfg.TMA, PREC=prec, UPCAST=False, INTERP=False)
                    specs.append(_spec(name, _down_kernel, sig, const, cfg))
                    if not fp32:  # H3MOE_COMBINE=lowp: slot rows stored in the activations' dtype
                        specs.append(_spec(f"experts_{role}_lowp[{dt},{cfg!r}]", _down_kernel, {**sig, "out_ptr": p},
                                           const, cfg))
                else:
                    sig = {"l_ptr": p, "r_ptr": p, "offsets_ptr": "*i32", "out_ptr": p, "M": "i32", "N": "i32"}
                    const = dict(**tile, TMA=cfg.TMA, PREC=prec, UPCAST=False, INTERP=False)
                    specs.append(_spec(name, _wgrad_kernel, sig, const, cfg))
    return specs
