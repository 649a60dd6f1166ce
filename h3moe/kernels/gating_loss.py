"""Triton kernels for H3Fusion's gating loss (h3moe.ops.triton_gating): p̄ (B, E) without (T, E) probabilities.

Per layer, p̄[b] = (1 / n_b) * sum_s m[b, s] * softmax(logits[b, s])   (n_b = sum_s m[b, s] clamped to >= 1,
or S without a mask). The loss on p̄ is a (B, E) cross-entropy that torch computes; its gradient
g[b] = dL/dp̄[b] comes back to the backward kernel.

`pbar_fwd_kernel`, grid (B, SPLIT): program (b, j) streams the rows [j*R, (j+1)*R) of sample b (R rows per
split, a multiple of BLOCK_S) in (BLOCK_S, E_PAD) tiles, takes an fp32 softmax per row (fp64 for fp64
logits), accumulates m * p in registers and writes one (E_PAD,) partial sum. Torch sums the SPLIT partials
(deterministic: no atomics) and divides by n_b. Extra memory: (B, SPLIT, E_PAD) fp32, never (T, E).

`pbar_bwd_kernel`, grid (cdiv(T, BLOCK_T),): recomputes the softmax p_t from the logits and writes
    dlogits[t] = m_t * p_t ⊙ (gs_b − <gs_b, p_t>),   gs_b = g_b / n_b (scaled by the caller, with 1/L),
in the logits' dtype.

Limits: E <= 1024 (E_PAD = next power of two, padding read as -inf); S = T / B rows per sample.
Tiles hold TILE_ELEMS elements (`rows_for(E_PAD)`), so nothing spills (compile tier, scripts/kernel_report.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .routing import softmax_rows

MAX_EXPERTS = 1024


#: Elements of one (rows, E_PAD) register tile: 2048 over 4 warps. 4096 used 168-255 registers and spilled
#: at E=64 (compile tier, scripts/kernel_report.py).
TILE_ELEMS = 2048


def rows_for(e_pad: int) -> int:
    """Rows per tile: (rows, E_PAD) of TILE_ELEMS elements, 16..512 rows (E is often 2..8 here)."""
    return max(16, min(512, TILE_ELEMS // e_pad))


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["S", "rows_per_split"])
def pbar_fwd_kernel(
    logits_ptr,  # (B*S, E) any float dtype, row stride stride_l, unit column stride
    mask_ptr,  # (B, S) any int / float dtype (bool as uint8) contiguous; unused without HAS_MASK
    partial_ptr,  # (B, SPLIT, E_PAD) fp32 (fp64), out: sum over this split's rows of m * p
    S,  # i32 rows per sample
    E,  # i32 experts
    stride_l,  # i32 row stride of logits
    rows_per_split,  # i32 R, a multiple of BLOCK_S
    HAS_MASK: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FP64: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    split = tl.num_programs(1)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    srow = tl.arange(0, BLOCK_S)
    if FP64:
        acc = tl.zeros((BLOCK_S, E_PAD), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_S, E_PAD), dtype=tl.float32)
    start = j * rows_per_split
    end = tl.minimum(start + rows_per_split, S)
    s0 = start
    while s0 < end:  # a while loop: triton 3.6's interpreter rejects runtime range() bounds under numpy >= 2.4
        s = s0 + srow  # (BLOCK_S,)
        row_ok = s < end
        t = b.to(tl.int64) * S + s  # (BLOCK_S,) flat token index
        x = tl.load(
            logits_ptr + t[:, None] * stride_l + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=float("-inf"),
        ).to(acc.dtype)
        x_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)
        ex = tl.exp(x - x_max[:, None])
        w = tl.where(row_ok, 1.0 / tl.where(row_ok, tl.sum(ex, axis=1), 1.0), 0.0)  # (BLOCK_S,) 0 past the end
        if HAS_MASK:
            w *= tl.load(mask_ptr + t, mask=row_ok, other=0.0).to(acc.dtype)
        acc += ex * w[:, None]
        s0 += BLOCK_S
    tot = tl.sum(acc, axis=0)  # (E_PAD,)
    tl.store(partial_ptr + (b * split + j) * E_PAD + cols, tot)


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["T", "S"])
def pbar_bwd_kernel(
    logits_ptr,  # (B*S, E) any float dtype, row stride stride_l
    mask_ptr,  # (B, S) any int / float dtype (bool as uint8) contiguous; unused without HAS_MASK
    gs_ptr,  # (B, E) fp32 (fp64) contiguous: dL/dp̄ / n_b
    grad_ptr,  # (B*S, E) logits' dtype contiguous, out
    T,  # i32 B*S
    S,  # i32
    E,  # i32
    stride_l,  # i32
    HAS_MASK: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    mask2 = row_ok[:, None] & col_ok[None, :]
    p = softmax_rows(logits_ptr, rows.to(tl.int64), row_ok, cols, col_ok, stride_l, FP64)  # (BLOCK_T, E_PAD)
    bidx = rows // S  # (BLOCK_T,) sample of each row
    g = tl.load(gs_ptr + bidx[:, None] * E + cols[None, :], mask=mask2, other=0.0).to(p.dtype)
    dx = p * (g - tl.sum(g * p, axis=1)[:, None])
    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(p.dtype)
        dx = dx * m[:, None]
    tl.store(grad_ptr + rows[:, None] * E + cols[None, :], dx.to(grad_ptr.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------------------------------------
# Compile tier (see h3moe/kernels/aot.py): the configurations triton_gating launches.

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def aot_specs():
    from .aot import AotSpec

    specs = []
    # E=4: H3Fusion fuses a handful of models; E=64: a fine-grained MoE. The logits dtype only changes the
    # tile load, so fp32 is compiled once; the compile tier stays fast.
    # Masks: int64 (a transformers attention_mask) with bf16 logits, fp32 with fp32 logits.
    for E, dt, variants in ((4, "bf16", "fwd0 fwd1 bwd"), (4, "fp32", "fwd1"), (64, "bf16", "fwd0 fwd1 bwd")):
        mask_t = "*fp32" if dt == "fp32" else "*i64"
        e_pad = triton.next_power_of_2(E)
        rows = rows_for(e_pad)
        for has_mask in (False, True):
            if f"fwd{int(has_mask)}" not in variants:
                continue
            specs.append(
                AotSpec(
                    name=f"gating_pbar_fwd[{dt},E={E},mask={int(has_mask)}]",
                    fn=pbar_fwd_kernel,
                    signature={
                        "logits_ptr": _DT[dt], "mask_ptr": mask_t, "partial_ptr": "*fp32", "S": "i32",
                        "E": "i32", "stride_l": "i32", "rows_per_split": "i32", "HAS_MASK": "constexpr",
                        "E_PAD": "constexpr", "BLOCK_S": "constexpr", "FP64": "constexpr",
                    },
                    constexprs={"HAS_MASK": has_mask, "E_PAD": e_pad, "BLOCK_S": rows, "FP64": False},
                    num_warps=4,
                    num_stages=1,
                )
            )
        if "bwd" in variants:
            specs.append(
                AotSpec(
                    name=f"gating_pbar_bwd[{dt},E={E},mask=1]",
                    fn=pbar_bwd_kernel,
                    signature={
                        "logits_ptr": _DT[dt], "mask_ptr": mask_t, "gs_ptr": "*fp32", "grad_ptr": _DT[dt],
                        "T": "i32", "S": "i32", "E": "i32", "stride_l": "i32", "HAS_MASK": "constexpr",
                        "E_PAD": "constexpr", "BLOCK_T": "constexpr", "FP64": "constexpr",
                    },
                    constexprs={"HAS_MASK": True, "E_PAD": e_pad, "BLOCK_T": rows, "FP64": False},
                    num_warps=4,
                    num_stages=1,
                )
            )
    return specs
