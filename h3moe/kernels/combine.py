"""Triton kernel of the slot combine: y (T, H) = sum over r < R and k < K of buf[r, t*K + k, :], cast to y's dtype.

The expert down projections write one row per (token, slot) — in slot order, so that no two programs write
the same element and no atomics are needed — and the quantized decode GEMVs one such buffer per split of
their reduction (R splits). This kernel turns those rows into the layer output in one pass: the R*K rows of
each token are added in a fixed order in fp32 (deterministic, run to run and across batch sizes) and the
sum is written once in y's dtype, where torch's `buf.sum(...)` followed by `.to(dtype)` takes two passes and
two launches (and a (T, H) fp32 temporary).

`combine_kernel`, 1-D grid of cdiv(H, BLOCK_H) * T programs: program p sums columns
[j*BLOCK_H, (j+1)*BLOCK_H) of token t = p // cdiv(H, BLOCK_H) (a 1-D grid: T may exceed the 65535 limit of
grid dimension y). R and K are constexpr (at most 8 each), so the R*K loads of a program are unrolled and in
flight together. Bandwidth bound: reads R*T*K*H elements of buf (fp32 or 16-bit), writes T*H of y.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["combine_kernel", "BLOCK_H", "aot_specs"]

#: Columns per program: 4 warps x 32 threads x 8 elements (two 16-byte fp32 loads per thread per row).
BLOCK_H = 1024


# batch-dependent ints unspecialized: one compile (hence no module load inside a CUDA graph capture) per config
@triton.jit(do_not_specialize=["TK"])
def combine_kernel(
    buf_ptr,  # (R, T*K, H) fp32 / fp16 / bf16 rows in slot order (flat slot t*K + k)
    y_ptr,  # (T, H) out, any float dtype
    TK,  # i32 T*K rows per split
    H,  # i32
    K: tl.constexpr,  # slots per token
    R: tl.constexpr,  # splits (1 unless a split-K GEMV wrote partial sums)
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nh = tl.cdiv(H, BLOCK_H)
    t = pid // nh
    cols = (pid % nh) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for r in tl.static_range(R):
        for k in tl.static_range(K):
            row = r * TK + t.to(tl.int64) * K + k
            acc += tl.load(buf_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * H + cols, acc.to(y_ptr.dtype.element_ty), mask=m)


def aot_specs() -> list:
    from .aot import AotSpec

    specs = []
    # the experts' combine (fp32 slot buffer, K = 2 and 8), the backward's d(x) combine (same), and the
    # quantized decode's split-K partials (R = 4)
    for buf, y, K, R in (("fp32", "bf16", 2, 1), ("fp32", "bf16", 8, 1), ("fp32", "fp16", 2, 4),
                         ("fp32", "fp32", 8, 1), ("bf16", "bf16", 8, 1)):
        specs.append(AotSpec(
            name=f"combine[{buf}->{y},K={K},R={R}]", fn=combine_kernel,
            signature={"buf_ptr": f"*{buf}", "y_ptr": f"*{y}", "TK": "i32", "H": "i32", "K": "constexpr",
                       "R": "constexpr", "BLOCK_H": "constexpr"},
            constexprs={"K": K, "R": R, "BLOCK_H": BLOCK_H}, num_warps=4, num_stages=1,
            divisible=("buf_ptr", "y_ptr", "H")))
    return specs
