"""Triton kernels for softmax top-k routing and its permutation metadata (h3moe.ops.triton_routing).

Algorithm (two launches, one at decode, no host synchronization, every shape fixed by (T, E, K)):

1. `route_topk_kernel`, grid (cdiv(T, BLOCK_T),). Each program takes BLOCK_T tokens:
   - loads the (BLOCK_T, E_PAD) logits tile (columns >= E read as -inf), fp32 softmax (fp64 for fp64 logits);
   - top-k by K rounds of "row max, then the lowest column holding it" (so ties between equal
     probabilities go to the lowest expert index; torch.topk leaves tie order unspecified, and on CPU it
     does not pick the lowest index: the two agree exactly when the K+1 largest probabilities of a row are
     distinct); a NaN row (a NaN or inf logit) ranks NaN below every probability, so it still picks K
     distinct experts (the lowest indices) and keeps NaN weights: every slot is placed, the output says NaN;
   - optional renormalization of the K selected probabilities; stores weights (T, K) and ids (T, K);
   - writes its block histogram hits[t, e] summed over t (one top-k never picks an expert twice, so a
     token holds at most one slot per expert) into row b of `block_counts` (nb, E_PAD);
   - "last block done": after its histogram store, each program bumps an int32 ticket with an acq_rel
     atomic; the program that draws the last ticket (all histograms visible to it) runs the scan: it
     turns `block_counts` in place into per-(block, expert) exclusive prefix sums over blocks, and writes
     counts (E,) and offsets (E+1,). No program waits on another, so it cannot deadlock, and the scan is
     O(nb * E) in total (a scan in every program would be O(nb^2 * E)).
2. `route_scatter_kernel`, grid (nb,). Program b recomputes its tokens' (BLOCK_T, E_PAD) hit matrix from
   ids, takes an exclusive cumsum over tokens (rank of a token within its expert, inside the block) and
   writes sorted_slots[offsets[e] + block_prefix[b, e] + rank] = t*K + k. This is a stable counting sort
   by expert: token order within an expert, as torch.argsort(ids.flatten(), stable=True) gives.

Gating-loss sums (PSUM, route_with_gating): the top-k kernel also writes, per program, the sum over its
tokens of mask_t * p_t into row pid of `psum_part` (nb, E_PAD); the caller sums each sample's rows (torch,
a (B, nbs, E) reduction: deterministic, no atomics) into psum (B, E). For that the grid is aligned to samples:
program pid = b * nbs + j takes the tokens [j*BLOCK_T, (j+1)*BLOCK_T) of sample b (S tokens per sample,
nbs = cdiv(S, BLOCK_T) programs per sample, the last one padded), and the scatter kernel uses the same
partition (SAMPLE_BLOCKS). Blocks are still in token order, so the counting sort stays stable. The softmax
is the one the top-k already holds in registers: no (T, E) probabilities are written.

Given ids (sort_by_expert for a (weights, ids) pair, as transformers' experts interface passes them):
`ids_histogram_kernel` builds the same block histograms from the ids (no softmax) and runs the same
last-block scan (`_histogram_and_scan`, shared), then `route_scatter_kernel` with DUPS=True, which also
places a token's repeated expert after its earlier slots (given ids need not come from a top-k).

Why not one launch: the destination of a slot depends on the histograms of all earlier blocks, which needs
a grid-wide barrier (a spin-wait on other programs can deadlock when the grid does not fit on the GPU).
Except with one block (ONE_BLOCK: T <= BLOCK_T, 8-64 tokens by E, so every decode step; route and the sort
of given ids, not route_with_gating): its program holds every token's hits, writes counts and offsets from
its own histogram and places the slots itself (_one_block_offsets, _place_slot, the scatter's code): one
launch, no scratch, no ticket and no memset.
Why not torch.argsort: a sort is O(S log S) and several launches; a counting sort on E buckets is O(S).

`route_bwd_kernel`, grid (cdiv(T, BLOCK_T),): recomputes the softmax p from the logits and writes
    dw_k = (g_k - <g, w>) / s   (renormalized: w = p_sel / s, s = sum of the K selected p), else dw_k = g_k
    dlogits = p * (dp - <dp, p>),  dp = dw scattered to the selected experts,
in the logits' dtype. With PSUM_GRAD it also takes d loss / d psum (B, E) and adds the gating-loss term
in the same pass:  dlogits += m_t * p_t * (dpsum_b - <dpsum_b, p_t>),  b = t // S. Without TOPK_GRAD the
top-k term is skipped (only psum was used).

Limits: E <= 256 (E_PAD = next power of two, padding read as -inf), 1 <= K <= E, T * K < 2**31.
Register tiles are (BLOCK_T, E_PAD); `block_t_for(E_PAD)` keeps them at TILE_ELEMS elements (tuned on the
compile tier so that nothing spills, see scripts/kernel_report.py). The K rounds are a loop, not unrolled
(unrolling K=8 made compiles take 20-80 s and used more registers).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: Largest expert count the routing kernels take (the register tile is (BLOCK_T, E_PAD)).
MAX_EXPERTS = 256


#: Elements of one (BLOCK_T, E_PAD) register tile. 2048 over 4 warps is 16 per thread; 4096 made the
#: top-k kernel use 255 registers and spill at E=64 (compile tier, scripts/kernel_report.py).
TILE_ELEMS = 2048


def block_t_for(e_pad: int) -> int:
    """Tokens per program: a (BLOCK_T, E_PAD) tile of TILE_ELEMS elements, 8..64 tokens."""
    return max(8, min(64, TILE_ELEMS // e_pad))


def num_warps_for(e_pad: int) -> int:
    return 4


@triton.jit
def softmax_rows(logits_ptr, rows64, row_ok, cols, col_ok, stride, FP64: tl.constexpr):
    """(BLOCK_T, E_PAD) softmax of the logits rows `rows64` in fp32 (fp64 with FP64); 0 in padded columns, and
    padded rows (row_ok false, all -inf) are kept finite. Shared by the routing and gating-loss kernels."""
    x = tl.load(
        logits_ptr + rows64[:, None] * stride + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    )
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    x_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - x_max[:, None])
    return ex / tl.where(row_ok, tl.sum(ex, axis=1), 1.0)[:, None]


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["T", "nb", "S", "nbs"])
def route_topk_kernel(
    logits_ptr,  # (T, E) any float dtype, row stride stride_lt, unit column stride
    weights_ptr,  # (T, K) fp32 (fp64 for fp64 logits), out
    ids_ptr,  # (T, K) int64, out
    block_counts_ptr,  # (nb, E_PAD) int32 scratch: block histograms, then per-block exclusive prefixes
    counts_ptr,  # (E,) int32, out
    offsets_ptr,  # (E+1,) int32, out
    ticket_ptr,  # (1,) int32, zero on entry (not read with ONE_BLOCK)
    sorted_slots_ptr,  # (T*K,) int32, out with ONE_BLOCK (else route_scatter_kernel writes it)
    mask_ptr,  # (T,) any int / float dtype (bool as uint8), token mask; read only with PSUM and HAS_MASK
    psum_part_ptr,  # (nb, E_PAD) fp32 (fp64), out with PSUM: sum over the program's tokens of mask * p
    T,  # i32 tokens
    E,  # i32 experts
    stride_lt,  # i32 row stride of logits
    nb,  # i32 number of programs: cdiv(T, BLOCK_T), or B * nbs with PSUM
    S,  # i32 tokens per sample (PSUM only)
    nbs,  # i32 programs per sample, cdiv(S, BLOCK_T) (PSUM only)
    K: tl.constexpr,  # top-k
    K_PAD: tl.constexpr,  # next power of two >= K
    E_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_B: tl.constexpr,  # block rows per step of the scan
    RENORM: tl.constexpr,  # divide the K selected probabilities by their sum
    FP64: tl.constexpr,  # compute in fp64 (fp64 logits)
    PSUM: tl.constexpr,  # sample-aligned blocks, write the per-block gating-loss sums
    HAS_MASK: tl.constexpr,  # PSUM weighs each token by mask_ptr[t]
    ONE_BLOCK: tl.constexpr = False,  # nb == 1, no PSUM: this program also writes sorted_slots
):
    pid = tl.program_id(0)
    if PSUM:  # program pid = b * nbs + j: tokens [j*BLOCK_T, (j+1)*BLOCK_T) of sample b, never two samples
        sample = pid // nbs
        srow = (pid - sample * nbs) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token index in the sample
        rows = sample * S + srow
        row_ok = srow < S
    else:
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        row_ok = rows < T
    cols = tl.arange(0, E_PAD)  # (E_PAD,)
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    # fp32 softmax; fully padded rows (rows >= T) are kept finite, they are never stored.
    p = softmax_rows(logits_ptr, rows64, row_ok, cols, col_ok, stride_lt, FP64)  # (BLOCK_T, E_PAD)
    if PSUM:
        if HAS_MASK:
            m = tl.load(mask_ptr + rows64, mask=row_ok, other=0).to(p.dtype)  # (BLOCK_T,)
            tl.store(psum_part_ptr + pid * E_PAD + cols, tl.sum(p * m[:, None], axis=0))
        else:
            tl.store(psum_part_ptr + pid * E_PAD + cols, tl.sum(p, axis=0))
    # Work copy: real experts hold p in [0, 1]; NaN (a NaN or inf logit makes the whole row NaN) -0.5, below
    # every probability, so such a row still picks K distinct experts in range (the lowest indices) and every
    # slot gets its row of sorted_slots (a row left unwritten would send the experts kernels to a garbage
    # token); padding -1; an expert already picked -2.
    work = tl.where(col_ok[None, :], tl.where(p == p, p, -0.5), -1.0)
    kcols = tl.arange(0, K_PAD)  # (K_PAD,)
    sel_w = tl.zeros((BLOCK_T, K_PAD), dtype=p.dtype)
    sel_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for k in range(K):
        m = tl.max(work, axis=1)  # (BLOCK_T,)
        idx = tl.min(tl.where(work == m[:, None], cols[None, :], E_PAD), axis=1)  # lowest index among ties
        idx = tl.minimum(idx, E - 1)  # (defensive: with NaN mapped, some column always holds the max)
        m = tl.where(m == -0.5, float("nan"), m)  # a NaN pick keeps its NaN weight: the output says so
        sel_w = tl.where(kcols[None, :] == k, m[:, None], sel_w)
        sel_i = tl.where(kcols[None, :] == k, idx[:, None], sel_i)
        work = tl.where(cols[None, :] == idx[:, None], -2.0, work)
    if RENORM:
        s = tl.where(row_ok, tl.sum(sel_w, axis=1), 1.0)  # padded K columns hold 0
        sel_w = sel_w / s[:, None]
    out_mask = row_ok[:, None] & (kcols[None, :] < K)
    out_off = rows64[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_off, sel_w, mask=out_mask)
    tl.store(ids_ptr + out_off, sel_i.to(tl.int64), mask=out_mask)

    # Block histogram: experts picked by this block's real tokens.
    hits = ((work == -2.0) & row_ok[:, None]).to(tl.int32)  # (BLOCK_T, E_PAD)
    if ONE_BLOCK:
        dest_e = _one_block_offsets(hits, cols, col_ok, counts_ptr, offsets_ptr)
        for k in range(K):  # this token's k-th expert, from the registers that hold the ids just stored
            e = tl.sum(tl.where(kcols[None, :] == k, sel_i, 0), axis=1)  # (BLOCK_T,)
            dest_e = _place_slot(dest_e, e, rows, row_ok, cols, k, E, sorted_slots_ptr, K, False)
    else:
        _histogram_and_scan(tl.sum(hits, axis=0), pid, nb, cols, col_ok, block_counts_ptr, counts_ptr,
                            offsets_ptr, ticket_ptr, E_PAD, BLOCK_B)


@triton.jit
def _one_block_offsets(hits, cols, col_ok, counts_ptr, offsets_ptr):
    """ONE_BLOCK (every token in this one program, as at decode): counts and offsets straight from the hit
    matrix hits (BLOCK_T, E_PAD), with no block histograms, ticket or scan; returns the destination row of
    each (token, expert) pair, offsets[e] + the number of earlier tokens on e (the stable counting sort of
    route_scatter_kernel, whose work this program then does itself: one launch for the whole routing)."""
    hist = tl.sum(tl.where(col_ok[None, :], hits, 0), axis=0)  # (E_PAD,)
    incl = tl.cumsum(hist, axis=0)
    tl.store(counts_ptr + cols, hist, mask=col_ok)
    tl.store(offsets_ptr + 1 + cols, incl, mask=col_ok)
    tl.store(offsets_ptr + cols, incl - hist, mask=cols == 0)
    return tl.cumsum(hits, axis=0) - hits + (incl - hist)[None, :]


@triton.jit
def _place_slot(dest_e, e, rows, row_ok, cols, k, E, sorted_slots_ptr, K: tl.constexpr, DUPS: tl.constexpr):
    """Write slot rows*K + k of tokens rows (BLOCK_T,) to its row of sorted_slots, dest_e[t, e[t]] (dest_e
    (BLOCK_T, E_PAD): the next free row of each (token, expert)); ids outside [0, E) are skipped. With DUPS
    (a token may name an expert twice) the token's next slot on that expert goes one row further. Returns
    dest_e."""
    here = cols[None, :] == e[:, None]  # (BLOCK_T, E_PAD)
    dest = tl.sum(tl.where(here, dest_e, 0), axis=1)  # (BLOCK_T,)
    if DUPS:
        dest_e += here.to(tl.int32)
    tl.store(sorted_slots_ptr + dest, (rows * K + k).to(tl.int32), mask=row_ok & (e >= 0) & (e < E))
    return dest_e


@triton.jit
def _histogram_and_scan(hist, pid, nb, cols, col_ok, block_counts_ptr, counts_ptr, offsets_ptr, ticket_ptr,
                        E_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    """Store this program's (E_PAD,) histogram into row pid of block_counts; the last program to arrive turns
    block_counts into per-(block, expert) exclusive prefixes over blocks and writes counts and offsets."""
    tl.store(block_counts_ptr + pid * E_PAD + cols, hist)
    # Release our histogram, acquire everyone's: the last program to arrive runs the scan. The barrier
    # orders every thread's histogram store before the (single-thread) release, as CUTLASS's semaphore does.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == nb - 1:
        carry = tl.zeros((E_PAD,), dtype=tl.int32)
        brows = tl.arange(0, BLOCK_B)
        # A while loop, not range(0, nb, ...): triton 3.6's interpreter cannot take a runtime range bound
        # under numpy >= 2.4 (int() of a 1-element array).
        b0 = 0
        while b0 < nb:
            b = b0 + brows
            ptrs = block_counts_ptr + b[:, None] * E_PAD + cols[None, :]
            bmask = (b < nb)[:, None]
            # .cg: read from L2, never from a stale L1 line.
            c = tl.load(ptrs, mask=bmask, other=0, cache_modifier=".cg")  # (BLOCK_B, E_PAD)
            incl = tl.cumsum(c, axis=0)
            tl.store(ptrs, incl - c + carry[None, :], mask=bmask)
            carry += tl.sum(c, axis=0)
            b0 += BLOCK_B
        tl.store(counts_ptr + cols, carry, mask=col_ok)
        incl_e = tl.cumsum(carry, axis=0)  # (E_PAD,) offsets[e+1]
        tl.store(offsets_ptr + 1 + cols, incl_e, mask=col_ok)
        tl.store(offsets_ptr + cols, incl_e - carry, mask=cols == 0)


@triton.jit
def _ids_hits(ids_ptr, rows64, row_ok, cols, K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """(BLOCK_T, E_PAD) int32: how many of token t's K slots name expert e (an id >= E lands in a padded
    column, which the callers ignore; a negative id matches nothing)."""
    hits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for k in range(K):
        e = tl.load(ids_ptr + rows64 * K + k, mask=row_ok, other=-1).to(tl.int32)
        hits += (cols[None, :] == e[:, None]).to(tl.int32)
    return hits


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["T", "nb"])
def ids_histogram_kernel(
    ids_ptr,  # (T, K) int64 expert ids in [0, E) (a token may name an expert more than once)
    block_counts_ptr,  # (nb, E_PAD) int32 scratch, as route_topk_kernel's
    counts_ptr,  # (E,) int32, out
    offsets_ptr,  # (E+1,) int32, out
    ticket_ptr,  # (1,) int32, zero on entry (not read with ONE_BLOCK)
    sorted_slots_ptr,  # (T*K,) int32, out with ONE_BLOCK (else route_scatter_kernel writes it)
    T,  # i32
    E,  # i32
    nb,  # i32 programs: cdiv(T, BLOCK_T)
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ONE_BLOCK: tl.constexpr = False,  # nb == 1: this program also writes sorted_slots (duplicate-safe)
):
    """route_topk_kernel's histogram and scan for ids that are given (h3moe.moe with a (weights, ids) pair, as
    transformers' experts interface passes them): the first launch of the Triton sort_by_expert."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    hits = _ids_hits(ids_ptr, rows64, row_ok, cols, K, BLOCK_T, E_PAD)
    if ONE_BLOCK:
        dest_e = _one_block_offsets(hits, cols, col_ok, counts_ptr, offsets_ptr)
        for k in range(K):
            e = tl.load(ids_ptr + rows64 * K + k, mask=row_ok, other=-1).to(tl.int32)
            dest_e = _place_slot(dest_e, e, rows, row_ok, cols, k, E, sorted_slots_ptr, K, True)
    else:
        hist = tl.where(col_ok, tl.sum(hits, axis=0), 0)
        _histogram_and_scan(hist, pid, nb, cols, col_ok, block_counts_ptr, counts_ptr, offsets_ptr, ticket_ptr,
                            E_PAD, BLOCK_B)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["T", "S", "nbs"])
def route_scatter_kernel(
    ids_ptr,  # (T, K) int64
    block_prefix_ptr,  # (nb, E_PAD) int32 rows of the block before this one, per expert
    offsets_ptr,  # (E+1,) int32
    sorted_slots_ptr,  # (T*K,) int32, out
    T,  # i32
    E,  # i32
    S,  # i32 tokens per sample (SAMPLE_BLOCKS only)
    nbs,  # i32 programs per sample (SAMPLE_BLOCKS only)
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # must equal route_topk_kernel's
    SAMPLE_BLOCKS: tl.constexpr,  # the sample-aligned partition of route_topk_kernel's PSUM
    DUPS: tl.constexpr = False,  # a token may name an expert more than once (given ids, not a top-k)
):
    pid = tl.program_id(0)
    if SAMPLE_BLOCKS:
        sample = pid // nbs
        srow = (pid - sample * nbs) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        rows = sample * S + srow
        row_ok = srow < S
    else:
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    rows64 = rows.to(tl.int64)
    hits = _ids_hits(ids_ptr, rows64, row_ok, cols, K, BLOCK_T, E_PAD)
    rank = tl.cumsum(hits, axis=0) - hits  # (BLOCK_T, E_PAD) exclusive: earlier tokens of the block
    base = tl.load(block_prefix_ptr + pid * E_PAD + cols) + tl.load(offsets_ptr + cols, mask=cols < E, other=0)
    dest_e = rank + base[None, :]  # (BLOCK_T, E_PAD) destination row of (token, expert)
    for k in range(K):
        e = tl.load(ids_ptr + rows64 * K + k, mask=row_ok, other=-1).to(tl.int32)
        dest_e = _place_slot(dest_e, e, rows, row_ok, cols, k, E, sorted_slots_ptr, K, DUPS)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["T", "S"])
def route_bwd_kernel(
    grad_w_ptr,  # (T, K) fp32 (fp64), d loss / d weights, contiguous; read only with TOPK_GRAD
    logits_ptr,  # (T, E) any float dtype, row stride stride_lt
    ids_ptr,  # (T, K) int64; read only with TOPK_GRAD
    dpsum_ptr,  # (B, E) fp32 (fp64) contiguous, d loss / d psum; read only with PSUM_GRAD
    mask_ptr,  # (T,) any int / float dtype (bool as uint8); read only with PSUM_GRAD and HAS_MASK
    grad_logits_ptr,  # (T, E) logits' dtype, contiguous, out
    T,  # i32
    E,  # i32
    stride_lt,  # i32
    S,  # i32 tokens per sample (PSUM_GRAD only)
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RENORM: tl.constexpr,
    FP64: tl.constexpr,
    TOPK_GRAD: tl.constexpr,  # add the gradient through the top-k weights
    PSUM_GRAD: tl.constexpr,  # add the gradient through psum
    HAS_MASK: tl.constexpr,  # psum was masked
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < T
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    p = softmax_rows(logits_ptr, rows64, row_ok, cols, col_ok, stride_lt, FP64)  # (BLOCK_T, E_PAD)
    if TOPK_GRAD:
        k_mask = row_ok[:, None] & (kcols[None, :] < K)
        kofs = rows64[:, None] * K + kcols[None, :]
        g = tl.load(grad_w_ptr + kofs, mask=k_mask, other=0.0).to(p.dtype)  # (BLOCK_T, K_PAD)
        ids = tl.load(ids_ptr + kofs, mask=k_mask, other=-1).to(tl.int32)  # (BLOCK_T, K_PAD)
        # Selected probabilities p[t, ids[t, k]].
        sel = tl.zeros((BLOCK_T, K_PAD), dtype=p.dtype)
        for k in range(K):
            e_k = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)  # (BLOCK_T,)
            p_k = tl.sum(tl.where(cols[None, :] == e_k[:, None], p, 0.0), axis=1)
            sel = tl.where(kcols[None, :] == k, p_k[:, None], sel)
        if RENORM:
            s = tl.sum(sel, axis=1)  # (BLOCK_T,)
            s = tl.where(row_ok, s, 1.0)
            w = sel / s[:, None]
            dw = (g - tl.sum(g * w, axis=1)[:, None]) / s[:, None]
        else:
            dw = g
        # dp scattered onto the experts; <dp, p> = sum_k dw_k * sel_k.
        dp = tl.zeros((BLOCK_T, E_PAD), dtype=p.dtype)
        for k in range(K):
            e_k = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)
            dw_k = tl.sum(tl.where(kcols[None, :] == k, dw, 0.0), axis=1)
            dp += tl.where(cols[None, :] == e_k[:, None], dw_k[:, None], 0.0)
        dot = tl.sum(dw * sel, axis=1)  # (BLOCK_T,)
    else:
        dp = tl.zeros((BLOCK_T, E_PAD), dtype=p.dtype)
        dot = tl.zeros((BLOCK_T,), dtype=p.dtype)
    if PSUM_GRAD:  # m_t * p_t * (gs_b - <gs_b, p_t>): fold m_t * gs_b into dp and m_t * <gs_b, p_t> into dot
        sample = rows64 // S  # (BLOCK_T,)
        gs = tl.load(
            dpsum_ptr + sample[:, None] * E + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(p.dtype)  # (BLOCK_T, E_PAD)
        if HAS_MASK:
            gs = gs * tl.load(mask_ptr + rows64, mask=row_ok, other=0).to(p.dtype)[:, None]
        dp += gs
        dot += tl.sum(gs * p, axis=1)
    dx = p * (dp - dot[:, None])
    tl.store(
        grad_logits_ptr + rows64[:, None] * E + cols[None, :],
        dx.to(grad_logits_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------------------
# Compile tier: the configurations route() and route_with_gating() launch (see h3moe/kernels/aot.py).

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "i64": "*i64", "u8": "*u8"}


def _cfg(E: int, K: int) -> dict:
    e_pad = triton.next_power_of_2(E)
    return dict(E_PAD=e_pad, K_PAD=triton.next_power_of_2(K), BLOCK_T=block_t_for(e_pad), K=K)


def _topk_spec(name, dt, c, nw, psum=False, mask_dt=None, one_block=False):
    from .aot import AotSpec

    return AotSpec(
        name=name,
        fn=route_topk_kernel,
        signature={
            "logits_ptr": _DT[dt], "weights_ptr": "*fp32", "ids_ptr": "*i64",
            "block_counts_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32",
            "ticket_ptr": "*i32", "sorted_slots_ptr": "*i32", "mask_ptr": _DT[mask_dt or dt],
            "psum_part_ptr": "*fp32",
            "T": "i32", "E": "i32", "stride_lt": "i32", "nb": "i32", "S": "i32", "nbs": "i32",
            "K": "constexpr", "K_PAD": "constexpr", "E_PAD": "constexpr",
            "BLOCK_T": "constexpr", "BLOCK_B": "constexpr", "RENORM": "constexpr",
            "FP64": "constexpr", "PSUM": "constexpr", "HAS_MASK": "constexpr", "ONE_BLOCK": "constexpr",
        },
        constexprs=dict(c, BLOCK_B=16, RENORM=True, FP64=False, PSUM=psum, HAS_MASK=mask_dt is not None,
                        ONE_BLOCK=one_block),
        num_warps=nw,
        num_stages=1,
    )  # fmt: skip


def _bwd_spec(name, dt, c, nw, topk_grad=True, psum_grad=False, mask_dt=None):
    from .aot import AotSpec

    return AotSpec(
        name=name,
        fn=route_bwd_kernel,
        signature={
            "grad_w_ptr": "*fp32", "logits_ptr": _DT[dt], "ids_ptr": "*i64", "dpsum_ptr": "*fp32",
            "mask_ptr": _DT[mask_dt or dt], "grad_logits_ptr": _DT[dt], "T": "i32", "E": "i32",
            "stride_lt": "i32", "S": "i32",
            "K": "constexpr", "K_PAD": "constexpr", "E_PAD": "constexpr", "BLOCK_T": "constexpr",
            "RENORM": "constexpr", "FP64": "constexpr", "TOPK_GRAD": "constexpr", "PSUM_GRAD": "constexpr",
            "HAS_MASK": "constexpr",
        },
        constexprs=dict(c, RENORM=True, FP64=False, TOPK_GRAD=topk_grad, PSUM_GRAD=psum_grad,
                        HAS_MASK=mask_dt is not None),
        num_warps=nw,
        num_stages=1,
    )  # fmt: skip


def _scatter_spec(name, c, nw, sample_blocks=False, dups=False):
    from .aot import AotSpec

    return AotSpec(
        name=name,
        fn=route_scatter_kernel,
        signature={
            "ids_ptr": "*i64", "block_prefix_ptr": "*i32", "offsets_ptr": "*i32",
            "sorted_slots_ptr": "*i32", "T": "i32", "E": "i32", "S": "i32", "nbs": "i32",
            "K": "constexpr", "E_PAD": "constexpr", "BLOCK_T": "constexpr", "SAMPLE_BLOCKS": "constexpr",
            "DUPS": "constexpr",
        },
        constexprs={"K": c["K"], "E_PAD": c["E_PAD"], "BLOCK_T": c["BLOCK_T"], "SAMPLE_BLOCKS": sample_blocks,
                    "DUPS": dups},
        num_warps=nw,
        num_stages=1,
    )  # fmt: skip


def _ids_hist_spec(name, c, nw, one_block=False):
    from .aot import AotSpec

    return AotSpec(
        name=name,
        fn=ids_histogram_kernel,
        signature={
            "ids_ptr": "*i64", "block_counts_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32",
            "ticket_ptr": "*i32", "sorted_slots_ptr": "*i32", "T": "i32", "E": "i32", "nb": "i32",
            "K": "constexpr", "E_PAD": "constexpr", "BLOCK_T": "constexpr", "BLOCK_B": "constexpr",
            "ONE_BLOCK": "constexpr",
        },
        constexprs={"K": c["K"], "E_PAD": c["E_PAD"], "BLOCK_T": c["BLOCK_T"], "BLOCK_B": 16, "ONE_BLOCK": one_block},
        num_warps=nw,
        num_stages=1,
    )  # fmt: skip


def aot_specs():
    specs = []
    # sort_by_expert from given ids (transformers' experts interface): histogram + scan, duplicate-safe scatter
    for E, K in ((8, 2), (128, 8)):
        c = _cfg(E, K)
        nw = num_warps_for(c["E_PAD"])
        specs.append(_ids_hist_spec(f"ids_histogram[E={E},K={K}]", c, nw))
        specs.append(_scatter_spec(f"route_scatter_dups[E={E},K={K}]", c, nw, dups=True))
        specs.append(_ids_hist_spec(f"ids_histogram_one_block[E={E},K={K}]", c, nw, one_block=True))
    # (E, K, logits dtypes): Mixtral-like 8/2, fine-grained 64/8, the largest E. The logits dtype only
    # changes the tile load, so fp32 is compiled once; the compile tier stays fast.
    for E, K, dts in ((8, 2, ("bf16",)), (64, 8, ("bf16", "fp32")), (256, 8, ("bf16",))):
        c = _cfg(E, K)
        nw = num_warps_for(c["E_PAD"])
        for dt in dts:
            specs.append(_topk_spec(f"route_topk[{dt},E={E},K={K}]", dt, c, nw))
            specs.append(_bwd_spec(f"route_bwd[{dt},E={E},K={K}]", dt, c, nw))
        specs.append(_scatter_spec(f"route_scatter[E={E},K={K}]", c, nw))
        # decode: the whole routing in one program (bf16 logits)
        specs.append(_topk_spec(f"route_topk_one_block[bf16,E={E},K={K}]", "bf16", c, nw, one_block=True))
    # route_with_gating (PSUM): bf16 logits with a transformers int64 attention mask (and without a mask),
    # the backward with both gradients, and with the psum gradient only; fp32 logits with an fp32 mask.
    # Training shapes have S >= BLOCK_T, so BLOCK_T is block_t_for(E_PAD) as above.
    scattered = set()
    psum_cases = ((8, 2, "bf16", "i64"), (64, 8, "bf16", "i64"), (64, 8, "fp32", "fp32"), (256, 8, "bf16", None))
    for E, K, dt, mask_dt in psum_cases:
        c = _cfg(E, K)
        nw = num_warps_for(c["E_PAD"])
        tag = f"{dt},E={E},K={K},mask={mask_dt or 0}"
        specs.append(_topk_spec(f"route_topk_psum[{tag}]", dt, c, nw, psum=True, mask_dt=mask_dt))
        specs.append(_bwd_spec(f"route_bwd_psum[{tag}]", dt, c, nw, psum_grad=True, mask_dt=mask_dt))
        if E == 64 and dt == "bf16":
            specs.append(_bwd_spec(f"route_bwd_psum_only[{tag}]", dt, c, nw, topk_grad=False, psum_grad=True,
                                   mask_dt=mask_dt))
        if (E, K) not in scattered:  # the scatter reads no logits and no mask: once per (E, K)
            scattered.add((E, K))
            specs.append(_scatter_spec(f"route_scatter_samples[E={E},K={K}]", c, nw, sample_blocks=True))
    return specs
